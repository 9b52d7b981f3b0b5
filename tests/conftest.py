"""Shared test set-up: offline, repo root importable, a private cache, tiny fixtures."""

import os
import shlex
import sys

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
