"""Shared test set-up: offline, repo root importable, a private cache, tiny fixtures."""

import glob
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A tiny BERT for fast in-process runs: built from a config, never downloaded.
TINY_BERT = [
    "--model_type=bert",
    "--config_overrides=hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,max_position_embeddings=128",
    "--tokenizer_vocab_size=400",
    "--max_seq_length=32",
    "--per_device_train_batch_size=4",
    "--per_device_eval_batch_size=4",
    "--report_to=none",
    "--disable_tqdm=True",
    "--logging_steps=1",
]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s (deselect with -m 'not slow')")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tokenized data, trained tokenizers and the embedded corpus go to a per-session folder."""
    path = tmp_path_factory.mktemp("scripts_cache")
    os.environ["HF_SCRIPTS_CACHE"] = str(path)
    return path


def shared_path(*parts):
    """A path under ../shared, or skip the test when the shared material is not there."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not available (shared benchmark data)")
    return path


SENTENCES = [
    "the cat sat on the mat and looked at the bird",
    "a dog ran in the park while the children played",
    "python is a programming language that reads like prose",
    "masked language models learn by filling in missing words",
    "the quick brown fox jumps over the lazy dog again",
    "training scripts should be easy to read and to change",
]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """train.txt / validation.txt with a few hundred short lines (and some blank ones)."""
    folder = tmp_path_factory.mktemp("corpus")
    lines = [f"{SENTENCES[i % len(SENTENCES)]} number {i % 17}" for i in range(300)]
    lines[10] = ""
    (folder / "train.txt").write_text("\n".join(lines[:260]) + "\n", encoding="utf-8")
    (folder / "validation.txt").write_text("\n".join(lines[260:]) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty folder to run the sweep agent in, with `python` on PATH being this interpreter, offline."""
    # ${interpreter} is plain "python" (as in wandb): make it this interpreter, through a script that execs it.
    # A symlink would not do: Python started through a link outside a virtual environment does not find the
    # environment's pyvenv.cfg and runs as the base interpreter, without the environment's packages.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bindir / "python").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_AGENT_DISABLE_FLAPPING", "WANDB_AGENT_MAX_INITIAL_FAILURES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _postgres_program(name):
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of the tests' own on localhost, started from the distribution's binaries (.ci/run
    installs them); skips, saying why, where there are none or no driver. Yields a function that creates a new
    empty database and returns its URL."""
    psycopg = pytest.importorskip("psycopg", reason="no psycopg: pip install 'psycopg[binary]' (requirements.txt)")
    initdb, pg_ctl = _postgres_program("initdb"), _postgres_program("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server here (initdb, pg_ctl): install the distribution's postgresql package")
    base, as_user = tempfile.mkdtemp(prefix="sweep-postgres-"), []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the package's postgres user
        import pwd
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        os.chown(base, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    data = os.path.join(base, "data")
    subprocess.run(as_user + [initdb, "-D", data, "-U", "sweeps", "--auth=trust", "-E", "UTF8"], check=True,
                   capture_output=True)
    options = f"-p {port} -k {base} -c listen_addresses=localhost -c max_connections=300 -c fsync=off"
    subprocess.run(as_user + [pg_ctl, "-D", data, "-o", options, "-l", os.path.join(base, "log"), "-w", "start"],
                   check=True, capture_output=True)
    made = []

    def new_database():
        name = f"sweeps{len(made)}"
        with psycopg.connect(f"host=localhost port={port} user=sweeps dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return f"postgresql+psycopg://sweeps@localhost:{port}/{name}"

    try:
        yield new_database
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
