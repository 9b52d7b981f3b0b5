"""Where the shared study lives (a journal file on one machine, a database across machines), and opening it."""
from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .schema import ConfigError, Sweep
from .space import _optuna_grid_params

def _serialize_sqlite(engine):
    """SQLite ignores SELECT ... FOR UPDATE, so two agents could pop the same queued trial.
    Taking the write lock when each transaction begins makes optuna's check-then-set atomic."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _manual_transactions(dbapi_connection, record):
        dbapi_connection.isolation_level = None  # let the "begin" hook below open them

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # pooled connections predate the hooks


# pip packages of the database drivers SQLAlchemy names in URLs (postgresql:// is psycopg 3 in SQLAlchemy 2.1).
DB_DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pg8000": "pg8000",
                      "pymysql": "PyMySQL", "mysqldb": "mysqlclient", "mysqlconnector": "mysql-connector-python"}


def _require_db_driver(url):
    """A database URL whose driver is missing fails at once, naming the package to install (Optuna would
    retry, then say only "Failed to import DB access module")."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except ArgumentError as e:
        raise ConfigError(f"--storage: not a database URL SQLAlchemy knows ({str(e).splitlines()[0]}); "
                          "e.g. postgresql://user:password@host/sweeps or sqlite:///sweeps.db")
    try:
        dialect.import_dbapi()
    except ImportError:
        package = DB_DRIVER_PACKAGES.get(dialect.driver, dialect.driver)
        raise ConfigError(f"--storage {parsed.render_as_string(hide_password=True)} needs the {dialect.driver} "
                          f"driver: pip install '{package}' (on every machine of the sweep)")


def make_storage(storage_arg, sweep_dir: Path):
    if storage_arg and "://" in storage_arg:
        _require_db_driver(storage_arg)
        kwargs = {"connect_args": {"timeout": 60}} if storage_arg.startswith("sqlite") else {}
        for attempt in range(4):
            try:
                storage = optuna.storages.RDBStorage(storage_arg, engine_kwargs=kwargs)
                break
            except Exception as e:  # also: agents racing to create the tables of a new database
                if attempt == 3:
                    raise ConfigError(f"--storage {storage_arg!r} cannot be opened: "
                                      f"{str(e).splitlines()[0]}")
                time.sleep(0.5 + attempt)
        if storage_arg.startswith("sqlite"):
            _serialize_sqlite(storage.engine)
        return storage
    # Absolute: Optuna's lock is a symlink to this path, and a relative one dangles, so a lock left by a killed
    # agent was never recognised as stale and every later agent spun on it forever.
    path = (Path(storage_arg) if storage_arg else sweep_dir / "optuna-journal.log").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A journal file is safe for many processes on one machine (file lock), unlike SQLite.
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


QUEUE_STAMP_EVERY = 50  # grid points queued between two progress stamps
QUEUE_STALE_SECONDS = 30.0  # an agent queueing the grid that stamps nothing for this long is taken for dead


def open_study(sweep: Sweep, storage, study_name, sampler, pruner, grid):
    """Create the study (the first agent also queues the grid) or join the existing one."""
    fingerprint = json.dumps({"method": sweep.method, "parameters": sweep.config["parameters"],
                              "metric": [sweep.metric, sweep.goal]}, sort_keys=True, default=str)
    direction = "maximize" if sweep.goal == "maximize" else "minimize"
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction=direction,
                                    sampler=sampler, pruner=pruner)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler,
                                  pruner=pruner)
        created = False
    if not created:
        # Another agent may be queueing the grid right now (2,000 points take ~45 s on PostgreSQL): wait while it
        # stamps its progress; take over only when it has shown none for QUEUE_STALE_SECONDS (it died).
        stamp, stamped_at = None, time.time()
        while "sweep_ready" not in (attrs := study.user_attrs):
            if attrs.get("sweep_queue_stamp") != stamp:
                stamp, stamped_at = attrs.get("sweep_queue_stamp"), time.time()
            elif time.time() - stamped_at > QUEUE_STALE_SECONDS:
                break
            time.sleep(0.5)
        if "sweep_ready" in study.user_attrs:
            if study.user_attrs.get("sweep_fingerprint") != fingerprint:
                raise ConfigError(
                    f"study {study_name!r} was started from a different method/parameters/metric;"
                    f" use --study-name NEW (or --sweep-dir) for a new sweep, or restore the YAML")
            return study
    # New study, or its creator died while setting it up: queue what is missing.
    study.set_user_attr("sweep_fingerprint", fingerprint)
    study.set_user_attr("sweep_config", json.loads(json.dumps(sweep.config, default=str)))
    if grid is not None:
        for k, index in enumerate(missing_grid_points(study.get_trials(deepcopy=False), len(grid))):
            if k % QUEUE_STAMP_EVERY == 0:
                study.set_user_attr("sweep_queue_stamp", [index, time.time()])
            queue_grid_point(study, sweep, grid, index)
    study.set_user_attr("sweep_ready", True)
    return study


def queue_grid_point(study, sweep: Sweep, grid: list, index: int):
    """Queue grid point `index` as a WAITING trial: the next trial any agent asks for runs it."""
    study.enqueue_trial(_optuna_grid_params(sweep.params, grid[index]), user_attrs={"sweep_grid_index": index})


def missing_grid_points(trials, size: int) -> list[int]:
    """The grid points no trial holds: none is queued or running, and none ran to an end that counts (lost and
    interrupted trials are discounted, their points queued again, unless the agent doing it died first)."""
    held = {t.user_attrs.get("sweep_grid_index") for t in trials
            if t.state in (TrialState.WAITING, TrialState.RUNNING) or not t.user_attrs.get("sweep_discount")}
    return [index for index in range(size) if index not in held]
