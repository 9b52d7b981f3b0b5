#!/usr/bin/env python
"""Offline sweep agent: runs a W&B sweep YAML with Optuna instead of the W&B service.

    python sweep.py SWEEP.yaml --count N [--study-name NAME] [--storage URL] [--sweep-dir DIR]

Run it from the project root, like `wandb agent`. Start it several times (same machine: same
command; other machines: the same --storage DB URL) and the agents share one Optuna study.
Rerunning a command resumes its study.

What a run gets (the env var contract):
    SWEEP_METRICS_FILE     <trial dir>/metrics.jsonl; append one JSON object per logged record,
                           W&B names as keys ({"eval/loss": 1.9, "train/global_step": 20}).
    SWEEP_TRIAL_DIR        <sweep dir>/trial-<number>/ (command.txt, params.json, log.txt, ...).
    WANDB_RUN_ID, WANDB_NAME   unique per trial.
    WANDB_SWEEP_PARAM_PATH a wandb config YAML with the trial's parameters, as `wandb agent` sets
                           it: wandb.init() in the run then puts them in run.config.
The metric's value for a run is the LAST value of metric.name it logged (W&B's summary default).
Hyperband counts one iteration per logged record that holds a finite metric.name value.

How agents share a sweep: the study lives in an Optuna storage (default: a journal file in the
sweep dir, safe for many processes on one machine; --storage URL for several machines). The agent
that creates the study queues every grid point as a WAITING trial; agents pop them atomically, and a
point queued twice (by an agent that joined while the grid was still being queued) runs once. run_cap
counts every trial that started, across agents. Each running trial carries its agent's id and a
heartbeat; a trial whose agent died (same machine, boot and PID namespace: its pid is gone; elsewhere:
no heartbeat for 5 minutes) is marked "lost" and its parameters re-queued. Ctrl-C marks the current
trial "interrupted" and re-queues it too, so rerunning the command resumes the sweep.
Each logged metric value is reported to Optuna as an intermediate value (step = iteration), and a
custom pruner applies W&B's hyperband rule to those values of all trials in the study.
Trial states: finished, failed, pruned, interrupted, lost.

Where this differs from W&B (deliberately):
  * q_* distributions without `q` give ints (q=1); W&B's schema default q=1.0 gives 32.0, which
    argparse type=int rejects. Quantized floats are rounded to 12 significant digits (0.3, not
    0.30000000000000004).
  * ${envvar:NAME} is resolved against the environment the run gets, so
    `--output_dir=${envvar:SWEEP_TRIAL_DIR}` gives each trial its own output folder. As in wandb,
    an unset NAME expands to the text NAME.
  * An unknown ${macro} is a config error (wandb silently drops it).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import difflib
import itertools
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import optuna
import yaml
from optuna.trial import TrialState

# Mirrors wandb agent: 30 s between SIGTERM and SIGKILL; 3 failures in the first 60 s is
# "flapping"; 5 failures with at most one success is "failing".
KILL_TIMEOUT = 30.0
FLAPPING_SECONDS, FLAPPING_FAILURES, MAX_INITIAL_FAILURES = 60, 3, 5
POLL_SECONDS = 0.2
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # no heartbeat for this long: the agent that ran the trial is gone
PRUNE_RECHECK_SECONDS = 5.0  # thresholds tighten as other runs report, so re-check now and then
GRID_LIMIT = 10_000
QUANTILE_EPS = 1e-6  # keeps normal/log_normal quantiles finite (about +-4.75 sigma)

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
MACROS = ("env", "interpreter", "program", "args", "args_no_equals", "args_no_hyphens",
          "args_no_boolean_flags", "args_json", "args_json_file", "args_append_hydra",
          "args_override_hydra")
ENVVAR_RE = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")  # the character set wandb accepts
PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")

TOP_LEVEL_KEYS = ("program", "method", "parameters", "metric", "early_terminate", "command",
                  "name", "description", "project", "entity", "run_cap", "controller", "job",
                  "image_uri", "apiVersion", "kind", "metrics", "scheduler")
METHODS = ("grid", "random", "bayes")
# distribution -> (required keys, optional keys); `distribution` itself is always allowed.
DISTRIBUTIONS = {
    "constant": ({"value"}, set()),
    "categorical": ({"values"}, set()),
    "categorical_w_probabilities": ({"values", "probabilities"}, set()),
    "int_uniform": ({"min", "max"}, set()),
    "uniform": ({"min", "max"}, set()),
    "q_uniform": ({"min", "max"}, {"q"}),
    "log_uniform": ({"min", "max"}, set()),
    "log_uniform_values": ({"min", "max"}, set()),
    "q_log_uniform": ({"min", "max"}, {"q"}),
    "q_log_uniform_values": ({"min", "max"}, {"q"}),
    "inv_log_uniform": ({"min", "max"}, set()),
    "inv_log_uniform_values": ({"min", "max"}, set()),
    "normal": (set(), {"mu", "sigma"}),
    "q_normal": (set(), {"mu", "sigma", "q"}),
    "log_normal": (set(), {"mu", "sigma"}),
    "q_log_normal": (set(), {"mu", "sigma", "q"}),
    "beta": (set(), {"a", "b"}),
    "q_beta": (set(), {"a", "b", "q"}),
}
DEFAULTS = {"q": 1, "mu": 0.0, "sigma": 1.0, "a": 1.0, "b": 1.0}
GRID_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "q_uniform")


class ConfigError(Exception):
    """A sweep YAML problem, reported as one line and exit code 2."""


# --------------------------------------------------------------------------- config

@dataclass
class Param:
    path: tuple  # nested parameters keep their path; "a.b" is only the display name
    dist: str
    spec: dict

    @property
    def name(self) -> str:
        return ".".join(self.path)


@dataclass
class Sweep:
    config: dict
    name: str
    method: str
    params: list
    program: str | None
    command: list
    metric: str | None = None
    goal: str = "minimize"
    target: float | None = None
    run_cap: int | None = None
    hyperband: dict | None = None  # {"bands": [...], "eta": float, "strict": bool}
    notes: list = field(default_factory=list)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _close(word, options) -> str:
    match = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _need_number(where, value, *, positive=False, nonneg=False):
    if not _is_num(value):
        hint = ""
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
            hint = f" (YAML reads {value} as text; write it with a dot, e.g. 1.0e-5)"
        raise ConfigError(f"{where} must be a number, got {value!r}{hint}")
    if positive and not value > 0:
        raise ConfigError(f"{where} must be > 0, got {value}")
    if nonneg and value < 0:
        raise ConfigError(f"{where} must be >= 0, got {value}")


def _parse_param(path: tuple, raw, out: list):
    where = "parameters." + ".".join(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping such as {{values: [1, 2]}} or "
                          f"{{min: 0.0, max: 1.0}}, got {raw!r}")
    if "parameters" in raw:
        if set(raw) != {"parameters"} or not isinstance(raw["parameters"], dict) \
                or not raw["parameters"]:
            raise ConfigError(f"{where}: a nested parameter holds only a non-empty "
                              f"'parameters' mapping")
        for key, sub in raw["parameters"].items():
            _check_param_name(f"{where}.parameters", key)
            _parse_param(path + (key,), sub, out)
        return
    dist = raw.get("distribution")
    if dist is None:  # W&B's inference rules
        if "value" in raw:
            dist = "constant"
        elif "values" in raw:
            dist = "categorical_w_probabilities" if "probabilities" in raw else "categorical"
        elif "min" in raw and "max" in raw:
            dist = "int_uniform" if _is_int(raw["min"]) and _is_int(raw["max"]) else "uniform"
        else:
            raise ConfigError(f"{where} has no value, values or min/max; give one of them or "
                              f"a distribution (one of: {', '.join(DISTRIBUTIONS)})")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}.distribution {dist!r} is not valid{_close(dist, DISTRIBUTIONS)}"
                          f"; use one of: {', '.join(DISTRIBUTIONS)}")
    required, optional = DISTRIBUTIONS[dist]
    allowed = required | optional | {"distribution"}
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{where}.{key} is not valid for distribution '{dist}'; "
                              f"allowed keys: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(raw))
    if missing:
        raise ConfigError(f"{where}.{missing[0]} is missing; distribution '{dist}' needs "
                          f"{' and '.join(sorted(required))}")
    spec = {k: v for k, v in raw.items() if k != "distribution"}
    for key in optional - set(spec):
        spec[key] = DEFAULTS[key]
    for key in ("min", "max", "mu", "sigma", "a", "b", "q"):
        if key in spec:
            _need_number(f"{where}.{key}", spec[key], positive=key in ("q", "a", "b"),
                         nonneg=key == "sigma")
    if "min" in spec and spec["min"] >= spec["max"]:  # as W&B: one value is `value:`, not a range
        raise ConfigError(f"{where}: min ({spec['min']}) must be < max ({spec['max']}); for one value use `value:`")
    if dist == "int_uniform" and not (_is_int(spec["min"]) and _is_int(spec["max"])):
        raise ConfigError(f"{where}: int_uniform needs integer min and max; use "
                          f"distribution: uniform for floats")
    if dist in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values") \
            and spec["min"] <= 0:
        raise ConfigError(f"{where}.min must be > 0 for {dist} (it is a value, not an exponent)")
    if dist in ("beta", "q_beta"):
        try:
            import scipy.stats  # noqa: F401
        except ImportError:
            raise ConfigError(f"{where}: the beta distribution needs scipy; pip install scipy")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise ConfigError(f"{where}.values must be a non-empty list, got {spec['values']!r}")
    for key in ("value", "values"):
        try:
            json.dumps(spec.get(key))  # values travel as JSON (args_json, the study, W&B)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{key} holds something JSON can't carry (YAML reads "
                              f"2024-01-01 as a date); quote it")
    if dist == "categorical_w_probabilities":
        probs = spec["probabilities"]
        if not isinstance(probs, list) or len(probs) != len(spec["values"]):
            raise ConfigError(f"{where}.probabilities must be a list with one number per value "
                              f"({len(spec['values'])})")
        for p in probs:
            _need_number(f"{where}.probabilities", p, nonneg=True)
        if abs(sum(probs) - 1.0) > 1e-6:
            raise ConfigError(f"{where}.probabilities sum to {sum(probs):g}; they must sum to 1")
    out.append(Param(path, dist, spec))


def _check_param_name(where, name):
    if not isinstance(name, str) or not PARAM_NAME_RE.match(name):
        raise ConfigError(f"{where}: parameter name {name!r} is not valid; use letters, digits, "
                          f"_ . - and start with a letter or _")


def _parse_hyperband(et) -> dict:
    where = "early_terminate"
    if not isinstance(et, dict):
        raise ConfigError(f"{where} must be a mapping like {{type: hyperband, min_iter: 3}}")
    allowed = {"type", "min_iter", "max_iter", "s", "eta", "strict"}
    for key in et:
        if key not in allowed:
            raise ConfigError(f"{where}.{key} is not valid{_close(key, allowed)}; allowed keys: "
                              f"{', '.join(sorted(allowed))}")
    if et.get("type") != "hyperband":
        raise ConfigError(f"{where}.type {et.get('type')!r} is not valid; use: hyperband")
    eta = et.get("eta", 3)
    _need_number(f"{where}.eta", eta)
    if eta <= 1:
        raise ConfigError(f"{where}.eta must be > 1, got {eta}")
    strict = et.get("strict", True)  # W&B's sweep schema (wandb/sweeps) defaults to true
    if not isinstance(strict, bool):
        raise ConfigError(f"{where}.strict must be true or false")
    if "max_iter" in et:  # W&B looks at max_iter first when both are given
        if "s" not in et:
            raise ConfigError(f"{where}.s is missing; max_iter needs s (the number of brackets)")
        for key in ("max_iter", "s"):
            if not _is_int(et[key]) or et[key] < 1:
                raise ConfigError(f"{where}.{key} must be a positive integer")
        bands, band = [], float(et["max_iter"])
        for _ in range(et["s"]):
            band /= eta
            if band < 1:
                break
            bands.append(int(band))
        bands.sort()
        if not bands:
            raise ConfigError(f"{where}: max_iter/eta is below 1, so there is no bracket; raise "
                              f"max_iter or lower eta")
    elif "min_iter" in et:
        if not _is_int(et["min_iter"]) or et["min_iter"] < 1:
            raise ConfigError(f"{where}.min_iter must be an integer >= 1")
        bands, band = [], float(et["min_iter"])
        while len(bands) < 100 and band < 1e12:
            bands.append(int(band))
            band *= eta
    else:
        raise ConfigError(f"{where} needs min_iter, or max_iter and s")
    return {"bands": bands, "eta": float(eta), "strict": strict}


def validate_config(cfg, source="sweep", cwd=None) -> Sweep:
    """Check a parsed sweep YAML against W&B's sweep schema; return the normalized Sweep."""
    cwd = Path(cwd or os.getcwd())
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source} must be a YAML mapping with method, parameters, ...")
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"unknown top-level key {key!r}{_close(key, TOP_LEVEL_KEYS)}; "
                              f"allowed keys: {', '.join(TOP_LEVEL_KEYS)}")
    for key in ("program", "name", "description", "project", "entity", "job", "image_uri",
                "apiVersion"):
        if key in cfg and not isinstance(cfg[key], str):
            raise ConfigError(f"{key} must be a string, got {cfg[key]!r}")
    if "kind" in cfg and cfg["kind"] != "sweep":
        raise ConfigError(f"kind {cfg['kind']!r} is not valid; use: sweep (or leave it out)")
    if "controller" in cfg and (not isinstance(cfg["controller"], dict)
                                or cfg["controller"].get("type") not in ("local", "cloud")):
        raise ConfigError("controller must be {type: local} or {type: cloud}")
    for key in ("metrics", "scheduler"):
        if key in cfg:
            raise ConfigError(f"{key} is for W&B's custom (multi-objective / Launch) schedulers, "
                              f"which this offline agent does not run; remove it and use metric")
    method = cfg.get("method")
    if method is None:
        raise ConfigError(f"method is missing; add method: {' | '.join(METHODS)}")
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not valid{_close(method, METHODS)}; use one of: "
                          f"{', '.join(METHODS)}")

    params_raw = cfg.get("parameters")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError("parameters is missing or empty; add e.g. parameters: "
                          "{learning_rate: {values: [1.0e-4, 3.0e-4]}}")
    params: list[Param] = []
    for key, raw in params_raw.items():
        _check_param_name("parameters", key)
        _parse_param((key,), raw, params)
    names = [p.name for p in params]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"parameters: {name!r} is defined twice (a nested parameter "
                              f"flattens to the same name)")
    params.sort(key=lambda p: p.path)  # W&B sorts parameters by name
    if method == "grid":
        size = 1
        for p in params:
            if p.dist not in GRID_DISTRIBUTIONS:
                raise ConfigError(
                    f"parameters.{p.name}: grid search needs discrete parameters (value, values, "
                    f"int_uniform, q_uniform) and '{p.dist}' is not; use values: [...] or "
                    f"method: random/bayes")
            size *= len(grid_choices(p))
            if not grid_choices(p):
                raise ConfigError(f"parameters.{p.name}: q_uniform on a grid takes min, min+q, ... "
                                  f"below max, and there are none; raise max")
        if size > GRID_LIMIT:
            raise ConfigError(f"parameters: the grid has {size} points (limit {GRID_LIMIT}); "
                              f"use method: random or fewer values")

    metric = cfg.get("metric")
    metric_name, goal, target = None, "minimize", None
    if metric is not None:
        if not isinstance(metric, dict):
            raise ConfigError("metric must be a mapping like {name: eval/loss, goal: minimize}")
        allowed = {"name", "goal", "target", "impute", "impute_while_running"}
        for key in metric:
            if key not in allowed:
                raise ConfigError(f"metric.{key} is not valid{_close(key, allowed)}; allowed keys:"
                                  f" {', '.join(sorted(allowed))}")
        metric_name = metric.get("name")
        if not isinstance(metric_name, str) or not metric_name:
            raise ConfigError("metric.name is missing; add e.g. metric: {name: eval/loss, "
                              "goal: minimize}")
        goal = metric.get("goal", "minimize")
        if goal not in ("minimize", "maximize"):
            raise ConfigError(f"metric.goal {goal!r} is not valid; use one of: minimize, maximize")
        target = metric.get("target")
        if target is not None:
            _need_number("metric.target", target)
    if method == "bayes" and metric_name is None:
        raise ConfigError("metric.name is missing; method 'bayes' needs a metric to optimize, "
                          "e.g. metric: {name: eval/loss, goal: minimize}")

    hyperband = None
    if "early_terminate" in cfg:
        if metric_name is None:
            raise ConfigError("early_terminate needs a metric; add metric: {name: ..., goal: ...}")
        hyperband = _parse_hyperband(cfg["early_terminate"])

    run_cap = cfg.get("run_cap")
    if run_cap is not None and (not _is_int(run_cap) or run_cap < 1):
        raise ConfigError(f"run_cap must be a positive integer, got {run_cap!r}")

    command = cfg.get("command", DEFAULT_COMMAND)
    if not isinstance(command, list) or not command:
        raise ConfigError("command must be a non-empty list, e.g. [${env}, ${interpreter}, "
                          "${program}, ${args}]")
    for item in command:
        if isinstance(item, (dict, list)) or item is None:
            raise ConfigError(f"command item {item!r} must be a string or number")
        text = str(item)
        if text.startswith("${") and text.endswith("}") and not ENVVAR_RE.fullmatch(text) \
                and text[2:-1] not in MACROS:
            raise ConfigError(f"command item {text!r} is not a known macro; use one of: "
                              f"{', '.join('${' + m + '}' for m in MACROS)}, ${{envvar:NAME}}")
    program = cfg.get("program")
    if "${program}" in [str(c) for c in command]:
        if program is None:
            hint = " (job/image_uri are W&B Launch options)" if ("job" in cfg or
                                                                 "image_uri" in cfg) else ""
            raise ConfigError(f"program is missing{hint}; add program: path/to/train.py")
        if not (cwd / program).is_file():
            raise ConfigError(f"program {program!r} does not exist (looked in {cwd}); fix the "
                              f"path or run the agent from the project root")
    notes = [f"ignoring {k} (not used offline)" for k in ("job", "image_uri", "controller")
             if k in cfg]
    if metric and ("impute" in metric or "impute_while_running" in metric):
        notes.append("ignoring metric.impute*: failed runs are left out of the search")
    return Sweep(config=cfg, name=cfg.get("name") or source, method=method, params=params,
                 program=program, command=command, metric=metric_name, goal=goal, target=target,
                 run_cap=run_cap, hyperband=hyperband, notes=notes)


def load_sweep(path, cwd=None) -> Sweep:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}")
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}; fix the syntax")
    return validate_config(cfg, source=path.stem, cwd=cwd)


# --------------------------------------------------------------------------- search space

def _clean(x: float) -> float:
    return float(f"{x:.12g}")


def _plain_choices(values) -> bool:
    """Optuna categoricals hold scalars and find a value by ==, so 1/True/1.0 would collide."""
    if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
        return False
    return all(not (a == b) for a, b in itertools.combinations(values, 2))


def grid_choices(p: Param) -> list:
    s = p.spec
    if p.dist == "constant":
        return [s["value"]]
    if p.dist == "categorical":  # a value listed twice is one grid point, as in W&B
        return list({json.dumps(v, sort_keys=True): v for v in s["values"]}.values())
    if p.dist == "int_uniform":
        return list(range(s["min"], s["max"] + 1))
    # q_uniform: W&B's grid uses arange(min, max, q), max excluded
    lo, hi, q = s["min"], s["max"], s["q"]
    n = max(0, math.ceil((hi - lo) / q))
    if all(_is_int(v) for v in (lo, hi, q)):
        return [lo + k * q for k in range(n)]
    return [_clean(lo + k * q) for k in range(n)]


def grid_points(params) -> list[dict]:
    """Every grid point, first parameter (by name) varying slowest, as W&B orders them."""
    names = [p.name for p in params]
    return [dict(zip(names, combo)) for combo in itertools.product(*map(grid_choices, params))]


def _quantize(x: float, q) -> int | float:
    k = round(x / q)
    return int(k * q) if _is_int(q) else _clean(k * q)


def _suggest_choice(trial, name, values):
    if _plain_choices(values):
        return trial.suggest_categorical(name, values)
    return values[trial.suggest_categorical(f"{name}[index]", list(range(len(values))))]


def _sample_one(trial, p: Param, grid: bool):
    s, name = p.spec, p.name
    if grid:
        return _suggest_choice(trial, name, grid_choices(p))
    d = p.dist
    if d == "constant":
        return s["value"]
    if d == "categorical":
        return _suggest_choice(trial, name, s["values"])
    if d == "categorical_w_probabilities":
        # A quantile mapped through the CDF keeps both the probabilities and a space TPE can model.
        u = trial.suggest_float(f"{name}[quantile]", 0.0, 1.0)
        total, acc = sum(s["probabilities"]), 0.0
        for value, prob in zip(s["values"], s["probabilities"]):
            acc += prob / total
            if u < acc and prob > 0:
                return value
        return next(v for v, pr in reversed(list(zip(s["values"], s["probabilities"]))) if pr > 0)
    if d == "int_uniform":
        return trial.suggest_int(name, s["min"], s["max"])
    if d == "uniform":
        return trial.suggest_float(name, float(s["min"]), float(s["max"]))
    if d == "q_uniform":
        return _quantize(trial.suggest_float(f"{name}[raw]", float(s["min"]), float(s["max"])),
                         s["q"])
    # Every log-uniform variant is log-uniform over some value range (inv_* included:
    # log(1/X) uniform on [log 1/max, log 1/min] is log X uniform on [log min, log max]).
    log_ranges = {
        "log_uniform": lambda: (math.exp(s["min"]), math.exp(s["max"])),
        "q_log_uniform": lambda: (math.exp(s["min"]), math.exp(s["max"])),
        "inv_log_uniform": lambda: (math.exp(-s["max"]), math.exp(-s["min"])),
        "log_uniform_values": lambda: (s["min"], s["max"]),
        "q_log_uniform_values": lambda: (s["min"], s["max"]),
        "inv_log_uniform_values": lambda: (s["min"], s["max"]),
    }
    if d in log_ranges:
        lo, hi = log_ranges[d]()
        if d.startswith("q_"):
            return _quantize(trial.suggest_float(f"{name}[raw]", float(lo), float(hi), log=True),
                             s["q"])
        return trial.suggest_float(name, float(lo), float(hi), log=True)
    # normal / log_normal / beta: optuna has no such priors, so sample the quantile and map it
    # through the inverse CDF; TPE then works in the distribution's own probability space.
    u = trial.suggest_float(f"{name}[quantile]", QUANTILE_EPS, 1 - QUANTILE_EPS)
    base = d[2:] if d.startswith("q_") else d
    if base in ("normal", "log_normal"):
        x = s["mu"] if s["sigma"] == 0 else NormalDist(s["mu"], s["sigma"]).inv_cdf(u)
        x = math.exp(x) if base == "log_normal" else x
    else:
        from scipy.stats import beta
        x = float(beta.ppf(u, s["a"], s["b"]))
    return _quantize(x, s["q"]) if d.startswith("q_") else float(x)


def nest(flat: dict, params) -> dict:
    """Rebuild nested parameters as dicts, since W&B passes a nested group as one value."""
    out: dict = {}
    for p in params:
        node = out
        for key in p.path[:-1]:
            node = node.setdefault(key, {})
        node[p.path[-1]] = flat[p.name]
    return out


def sample_params(trial, params, grid: bool = False) -> dict:
    """Draw one value per parameter through `trial`; returns W&B-named (nested) params."""
    return nest({p.name: _sample_one(trial, p, grid) for p in params}, params)


def _optuna_grid_params(params, point: dict) -> dict:
    """The fixed optuna params that make _sample_one(grid=True) return `point`."""
    out = {}
    for p in params:
        choices = grid_choices(p)
        if _plain_choices(choices):
            out[p.name] = point[p.name]
        else:
            out[f"{p.name}[index]"] = next(i for i, c in enumerate(choices)
                                           if c == point[p.name] and type(c) is type(point[p.name]))
    return out


# --------------------------------------------------------------------------- command

def render_command(command, program, params: dict, args_json_file=None, environ=None,
                   windows=None) -> list[str]:
    """Expand a sweep `command` into an argv list exactly as `wandb agent` does.

    Only whole items are macros; ${envvar:NAME} is replaced inside any item. Parameter values
    become argv items of their own and are never parsed by a shell.
    """
    environ = os.environ if environ is None else environ
    windows = platform.system() == "Windows" if windows is None else windows
    flags = [f"--{k}={v}" for k, v in params.items()]
    expansions = {
        "env": [] if windows else ["/usr/bin/env"],
        "interpreter": ["python"],  # wandb hardcodes "python"; write python3 or a path to differ
        "program": [] if program is None else [str(program)],
        "args": flags,
        "args_no_equals": [x for k, v in params.items() for x in (f"--{k}", str(v))],
        "args_no_hyphens": [f"{k}={v}" for k, v in params.items()],
        "args_no_boolean_flags": [f"--{k}" if isinstance(v, bool) else f"--{k}={v}"
                                  for k, v in params.items() if v is not False],
        "args_json": [json.dumps(params)],
        "args_append_hydra": [f"+{k}={v}" for k, v in params.items()],
        "args_override_hydra": [f"++{k}={v}" for k, v in params.items()],
    }
    if args_json_file is not None:
        expansions["args_json_file"] = [str(args_json_file)]
    argv: list[str] = []
    for item in command or DEFAULT_COMMAND:
        text = ENVVAR_RE.sub(lambda m: environ.get(m.group(1), m.group(1)), str(item))
        if text.startswith("${") and text.endswith("}"):
            if text[2:-1] not in expansions:
                raise ValueError(f"unknown command macro {text}")
            argv += expansions[text[2:-1]]
        else:
            argv.append(text)
    return argv


# --------------------------------------------------------------------------- hyperband

def hyperband_should_stop(history, all_histories, bands, eta, strict=True):
    """W&B's hyperband rule on logged values, oriented so lower is better.

    Band b is reached after b logged values. Its threshold is the value at index
    int(n/eta) of the sorted b-th values of the n runs (any state, this one included)
    that got that far. A run past band b stops when its best value so far (strict:
    its b-th value) is worse than the threshold of the last band it passed.
    Returns (stop, band, threshold).
    """
    band = threshold = None
    for b in bands:
        if b > len(history):
            break
        values = sorted(h[b - 1] for h in all_histories if len(h) >= b)
        band = b
        threshold = values[int((1.0 / eta) * len(values))] if values else math.inf
    if band is None:
        return False, None, None
    value = history[band - 1] if strict else min(history)
    return value > threshold, band, threshold


def _history(trial, maximize: bool) -> list[float]:
    values = [v for _, v in sorted(trial.intermediate_values.items()) if math.isfinite(v)]
    return [-v for v in values] if maximize else values


class WandbHyperbandPruner(optuna.pruners.BasePruner):
    """Optuna pruner applying W&B's hyperband rule to the values runs reported as iterations."""

    def __init__(self, bands, eta, strict=True):
        self.bands, self.eta, self.strict = bands, eta, strict
        self.last = (None, None)

    def prune(self, study, trial) -> bool:
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        mine = _history(trial, maximize)
        histories = [_history(t, maximize) for t in study.get_trials(deepcopy=False)
                     if t.number != trial.number and t.intermediate_values]
        stop, band, threshold = hyperband_should_stop(mine, histories + [mine], self.bands,
                                                      self.eta, self.strict)
        if threshold is not None and maximize:
            threshold = -threshold
        self.last = (band, threshold)
        return stop


# --------------------------------------------------------------------------- running a trial

class MetricsTail:
    """Reads the records a run appends to metrics.jsonl, a complete line at a time."""

    def __init__(self, path: Path, metric: str | None):
        self.path, self.metric = path, metric
        self.offset, self.count, self.last = 0, 0, None

    def poll(self, final=False) -> list[float]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        end = len(chunk) if final else chunk.rfind(b"\n") + 1
        self.offset += end
        new = []
        for line in chunk[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            value = record.get(self.metric) if isinstance(record, dict) else None
            if not _is_num(value):
                continue
            self.last = float(value)
            if math.isfinite(value):
                self.count += 1
                new.append(float(value))
        return new


def _die_with_parent():
    # Linux: the run gets SIGTERM if the agent is killed outright, instead of holding a GPU.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc, timeout=KILL_TIMEOUT):
    """SIGTERM the run's process group, SIGKILL it if still alive after `timeout` seconds."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
    _signal_group(proc, signal.SIGKILL)  # stragglers (dataloader workers) in the group


def _log_tail(path: Path, lines=20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _flat(params: dict, prefix="") -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in _flat(params).items())


def _first_line_of(*paths) -> str:
    """The first 12 characters of the first of these files that can be read ("" if none)."""
    for path in paths:
        try:
            return Path(path).read_text().strip()[:12]
        except OSError:
            pass
    return ""


def _process_space() -> str:
    """Where a pid means the same process: the machine (machine-id), its boot (cloned VMs share a machine-id, not
    a boot id) and the PID namespace (containers share both). Agents that differ here judge each other only by
    heartbeat, never by whether a pid exists."""
    try:
        pid_namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        pid_namespace = ""
    return "/".join((_first_line_of("/etc/machine-id", "/var/lib/dbus/machine-id"),
                     _first_line_of("/proc/sys/kernel/random/boot_id"), pid_namespace))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- agent

@dataclass
class SweepResult:
    records: list  # the trials this agent ran, in order
    best: dict | None  # best finished trial of the whole study
    stop_reason: str
    exit_code: int
    sweep_dir: Path
    study_name: str


class Agent:
    def __init__(self, sweep: Sweep, study, sweep_dir: Path, study_name: str, count=None,
                 kill_timeout=KILL_TIMEOUT, grid=None, plots=True):
        self.sweep, self.study, self.dir, self.study_name = sweep, study, sweep_dir, study_name
        self.count, self.kill_timeout, self.grid, self.plots = count, kill_timeout, grid, plots
        self.host = f"{socket.gethostname()}/{_process_space()}"
        self.agent_id = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.records: list[dict] = []
        self.failed = 0
        self.started = time.time()
        self.signal = None  # set by the first Ctrl-C / SIGTERM

    # ----- shared-study bookkeeping
    def _trials(self, states=None):
        return self.study.get_trials(deepcopy=False, states=states)

    def _counted(self, t) -> bool:
        return t.state != TrialState.WAITING and not t.user_attrs.get("sweep_discount")

    def _requeue(self, t):
        """Queue an unfinished trial's parameters again: the next trial of the study (any agent's) runs them."""
        index = t.user_attrs.get("sweep_grid_index")
        if self.grid is not None and index is not None:
            self.study.enqueue_trial(_optuna_grid_params(self.sweep.params, self.grid[index]),
                                     user_attrs={"sweep_grid_index": index})
        elif self.grid is None:
            self.study.enqueue_trial(dict(t.params), user_attrs={"sweep_requeued_from": t.number})

    def reap_dead_trials(self):
        """Fail and re-queue trials left RUNNING by agents that are gone."""
        now = time.time()
        for t in self._trials((TrialState.RUNNING,)):
            owner = t.user_attrs.get("sweep_agent")
            if owner == self.agent_id:
                continue
            beat = t.user_attrs.get("sweep_heartbeat") or t.datetime_start.timestamp()
            dead = now - beat > STALE_SECONDS
            host, pid, _ = (owner or "::").rsplit(":", 2)
            if host == self.host and pid.isdigit():  # same machine: no need to wait
                dead = dead or not _pid_alive(int(pid))
            if not dead:
                continue
            storage = self.study._storage  # attrs of a trial this process did not ask for
            try:
                storage.set_trial_user_attr(t._trial_id, "sweep_state", "lost")
                storage.set_trial_user_attr(t._trial_id, "sweep_discount", True)
                self.study.tell(t.number, state=TrialState.FAIL)
            except Exception:  # another agent got there first
                continue
            self._requeue(t)
            print(f"  trial {t.number} was left running by a dead agent ({owner or 'unknown'}); "
                  f"marked lost and re-queued")

    def _target_reached(self) -> bool:
        target = self.sweep.target
        if target is None:
            return False
        better = (lambda v: v <= target) if self.sweep.goal == "minimize" else \
            (lambda v: v >= target)
        for t in self._trials():
            values = list(t.intermediate_values.values())
            if t.state == TrialState.COMPLETE and t.value is not None:
                values.append(t.value)
            if any(math.isfinite(v) and better(v) for v in values):
                return True
        return False

    def _stop_reason(self) -> str | None:
        if self._target_reached():
            return f"metric.target {self.sweep.target} reached"
        trials = self._trials()
        if self.sweep.run_cap and sum(map(self._counted, trials)) >= self.sweep.run_cap:
            return f"run_cap {self.sweep.run_cap} reached"
        if self.grid is not None and not any(t.state == TrialState.WAITING for t in trials):
            return "grid finished: every point has been run or is running" + self._held_elsewhere(trials)
        return None

    def _held_elsewhere(self, trials) -> str:
        """The grid points other agents still run, and until when each stays theirs if their heartbeat stops."""
        held = []
        for t in trials:
            if t.state == TrialState.RUNNING and t.user_attrs.get("sweep_agent") != self.agent_id:
                beat = t.user_attrs.get("sweep_heartbeat") or t.datetime_start.timestamp()
                until = time.strftime("%H:%M:%S", time.localtime(beat + STALE_SECONDS))
                held.append(f"trial {t.number} (grid point {t.user_attrs.get('sweep_grid_index')}, agent "
                            f"{t.user_attrs.get('sweep_agent', '?')}; re-queued at {until} if its heartbeat stops)")
        return ("; still running elsewhere: " + ", ".join(held) + ". Start an agent after that to run any "
                "point whose agent died") if held else ""

    def _discard(self, trial, requeue: bool):
        trial.set_user_attr("sweep_discount", True)
        self.study.tell(trial, state=TrialState.FAIL)
        if requeue:
            self._requeue(trial)

    def _point_taken(self, trial, index) -> bool:
        """Whether another trial runs or ran this grid point. Agents that join while the grid is being queued can
        queue a point twice; the copy is dropped here, so no point runs twice (of two copies started at the same
        moment, the earlier start, then the lower number, runs)."""
        mine = (trial.datetime_start, trial.number)
        return any(t.number != trial.number and t.user_attrs.get("sweep_grid_index") == index
                   and t.state != TrialState.WAITING and not t.user_attrs.get("sweep_discount")
                   and (t.datetime_start, t.number) < mine for t in self._trials())

    def _claim(self):
        """Ask for a trial; returns (trial, None) or (None, reason to stop)."""
        while True:
            trial = self.study.ask()
            grid_index = trial.user_attrs.get("sweep_grid_index")
            if self.grid is not None and grid_index is None:  # the queue ran dry under us
                self._discard(trial, requeue=False)
                return None, self._stop_reason() or "grid finished: every point has been run or is running"
            if grid_index is None or not self._point_taken(trial, grid_index):
                break
            self._discard(trial, requeue=False)
            print(f"  trial {trial.number}: grid point {grid_index} was queued twice; it runs in another trial")
        if self.sweep.run_cap:
            earlier = sum(self._counted(t) for t in self._trials() if t.number < trial.number)
            if earlier >= self.sweep.run_cap:  # another agent took the last slot
                self._discard(trial, requeue=True)
                return None, f"run_cap {self.sweep.run_cap} reached"
        return trial, None

    # ----- one trial
    def _trial_dir(self, number: int) -> Path:
        for k in itertools.count():
            path = self.dir / (f"trial-{number}" if k == 0 else f"trial-{number}-{k}")
            try:
                path.mkdir(parents=True)
                return path
            except FileExistsError:  # left by another study in this folder: keep it
                continue

    def run_trial(self, trial) -> dict:
        sweep = self.sweep
        params = sample_params(trial, sweep.params, grid=self.grid is not None)
        tdir = self._trial_dir(trial.number).resolve()
        params_file, metrics_file, log_file = (tdir / "params.json", tdir / "metrics.jsonl",
                                               tdir / "log.txt")
        params_file.write_text(json.dumps(params))
        wandb_config = tdir / "wandb-sweep-config.yaml"  # the format wandb agent writes
        wandb_config.write_text("wandb_version: 1\n\n" + yaml.safe_dump(
            {k: {"value": v} for k, v in params.items()}, sort_keys=False))
        metrics_file.touch()
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", self.study_name)[:32]
        env = dict(os.environ)
        env.update(SWEEP_METRICS_FILE=str(metrics_file), SWEEP_TRIAL_DIR=str(tdir),
                   WANDB_RUN_ID=f"{slug}-t{trial.number}-{uuid.uuid4().hex[:6]}",
                   WANDB_NAME=f"{self.study_name}-trial-{trial.number}",
                   WANDB_SWEEP_PARAM_PATH=str(wandb_config))
        env.setdefault("PYTHONUNBUFFERED", "1")  # so log.txt follows the run live
        for key in ("project", "entity"):
            if key in sweep.config:
                env.setdefault(f"WANDB_{key.upper()}", sweep.config[key])
        argv = render_command(sweep.command, sweep.program, params, args_json_file=params_file,
                              environ=env)
        (tdir / "command.txt").write_text(shlex.join(argv) + "\n")
        for key, value in dict(sweep_params=params, sweep_dir=str(tdir),
                               sweep_agent=self.agent_id, sweep_heartbeat=time.time(),
                               sweep_state="running").items():
            trial.set_user_attr(key, value)
        self._line(trial.number, "started", None, None, params)

        start = time.time()
        tail = MetricsTail(metrics_file, sweep.metric)
        pruner = self.study.pruner if isinstance(self.study.pruner, WandbHyperbandPruner) else None
        state, rc, note = None, None, ""
        with open(log_file, "wb") as log:
            try:
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_die_with_parent
                                        if sys.platform.startswith("linux") else None)
            except OSError as e:
                log.write(f"sweep agent: cannot start {argv[0]!r}: {e}\n".encode())
                proc, rc = None, 127
        if proc is not None:
            try:
                state, rc = self._watch(trial, proc, tail, pruner)
            except KeyboardInterrupt:  # Ctrl-C twice: no grace period
                self.signal = self.signal or signal.SIGINT
                stop_process(proc, timeout=0)
                state, rc = "interrupted", proc.returncode
        tail.poll(final=True)
        duration = time.time() - start
        value = tail.last
        if state is None:
            state = "finished" if rc == 0 else "failed"
        if state == "failed":
            self.failed += 1
            note = f"exit code {rc}" + (f" ({signal.Signals(-rc).name})" if rc < 0 else "")
        elif state == "pruned":
            band, threshold = pruner.last
            note = f"stopped by hyperband at iteration {tail.count} (band {band}, " \
                   f"threshold {_fmt(threshold)})"
        elif state == "finished" and sweep.metric and value is None:
            note = f"{sweep.metric} was never logged"
        record = dict(number=trial.number, state=state, value=value, iterations=tail.count,
                      exit_code=rc, duration_s=round(duration, 3), params=params, dir=str(tdir),
                      log_tail=_log_tail(log_file) if state == "failed" else "", note=note)
        self._finish(trial, record)
        self._line(trial.number, state, value, duration, params, note)
        if state == "failed":
            print("        " + "\n        ".join(record["log_tail"].splitlines()[-5:]))
        return record

    def _watch(self, trial, proc, tail, pruner):
        last_beat = last_check = time.time()
        while True:
            rc = proc.poll()
            new = tail.poll()
            now = time.time()
            try:
                first = tail.count - len(new) + 1
                for i, value in enumerate(new):  # step = iteration number, as hyperband counts
                    trial.report(value, step=first + i)
                if rc is not None:
                    return None, rc
                if self.signal is not None:
                    print(f"  stopping trial {trial.number} (SIGTERM, SIGKILL after "
                          f"{self.kill_timeout:g} s)")
                    stop_process(proc, self.kill_timeout)
                    return "interrupted", proc.returncode
                if pruner and tail.count and (new or now - last_check > PRUNE_RECHECK_SECONDS):
                    last_check = now
                    if trial.should_prune():
                        stop_process(proc, self.kill_timeout)
                        return "pruned", proc.returncode
                if now - last_beat > HEARTBEAT_SECONDS:
                    trial.set_user_attr("sweep_heartbeat", now)
                    last_beat = now
            except optuna.exceptions.UpdateFinishedTrialError:
                # We missed heartbeats (agent suspended?) and another agent re-queued the trial.
                print(f"  trial {trial.number} was marked lost by another agent; stopping it")
                stop_process(proc, self.kill_timeout)
                return "lost", proc.returncode
            time.sleep(POLL_SECONDS)

    def _finish(self, trial, record):
        state, value = record["state"], record["value"]
        attrs = dict(sweep_state=state, sweep_value=value, sweep_exit_code=record["exit_code"],
                     sweep_duration_s=record["duration_s"], sweep_iterations=record["iterations"],
                     sweep_log_tail=record["log_tail"][-2000:])
        if state == "interrupted":
            attrs["sweep_discount"] = True  # did not run to the end: resume runs it again
        if state == "lost":
            return  # already recorded by the agent that took it over
        try:
            for key, val in attrs.items():
                trial.set_user_attr(key, val)
            if state == "pruned":
                self.study.tell(trial, state=TrialState.PRUNED)
            elif state == "finished" and not self.sweep.metric:
                self.study.tell(trial, 0.0)  # optuna needs a value; without a metric it is moot
            elif state == "finished" and value is not None and math.isfinite(value):
                self.study.tell(trial, value)
            else:
                self.study.tell(trial, state=TrialState.FAIL)
        except Exception as e:  # e.g. another agent took us for dead and failed the trial
            print(f"  warning: could not record trial {trial.number} in the study: {e}")
            return
        if state == "interrupted":
            self._requeue(trial)

    def _failure_guard(self) -> str | None:
        ran = len(self.records)
        flapping = os.environ.get("WANDB_AGENT_DISABLE_FLAPPING") != "true"
        max_initial = int(os.environ.get("WANDB_AGENT_MAX_INITIAL_FAILURES", MAX_INITIAL_FAILURES))
        last = self.records[-1]["dir"] + "/log.txt" if self.records else ""
        if flapping and time.time() - self.started < FLAPPING_SECONDS \
                and self.failed >= FLAPPING_FAILURES:
            return (f"{self.failed} runs failed within {FLAPPING_SECONDS} s of starting; the "
                    f"program looks broken, see {last}")
        if self.failed >= max_initial and self.failed >= ran - 1:
            return f"{self.failed} of the first {ran} runs failed; see {last}"
        return None

    # ----- output
    def _line(self, number, state, value, duration, params, note=""):
        dur = "-" if duration is None else f"{duration:.1f}s"
        value = "-" if value is None else _fmt(value)
        extra = f"  [{note}]" if note else ""
        print(f"{number:>6}  {state:<11} {value:>12} {dur:>8}  {_params_text(params)}{extra}",
              flush=True)

    def run(self) -> SweepResult:
        s = self.sweep
        goal = f"{s.goal} {s.metric}" if s.metric else "no metric"
        print(f"sweep {s.name!r}: {s.method}, {goal}; study {self.study_name!r}; "
              f"dir {self.dir}")
        for note in s.notes:
            print(f"  note: {note}")
        print(f"{'trial':>6}  {'state':<11} {(s.metric or 'metric')[-12:]:>12} {'time':>8}  "
              f"params", flush=True)
        reason, exit_code = None, 0
        try:
            self.reap_dead_trials()
            while self.signal is None:
                if self.count is not None and len(self.records) >= self.count:
                    reason = f"--count {self.count} reached"
                    break
                self.reap_dead_trials()
                reason = self._stop_reason()
                if reason:
                    break
                trial, reason = self._claim()
                if trial is None:
                    break
                self.records.append(self.run_trial(trial))
                reason = self._failure_guard()
                if reason:
                    exit_code = 1
                    break
        except KeyboardInterrupt:  # the second Ctrl-C: stop at once
            self.signal = self.signal or signal.SIGINT
        if self.signal is not None:
            reason, exit_code = "interrupted", 128 + int(self.signal)
        return self._summary(reason or "done", exit_code)

    def _summary(self, reason, exit_code) -> SweepResult:
        trials = [t for t in self._trials() if t.user_attrs.get("sweep_state")]
        print(f"\nstopped: {reason}")
        mine = {}
        for r in self.records:
            mine[r["state"]] = mine.get(r["state"], 0) + 1
        study = {}
        for t in trials:
            study[t.user_attrs["sweep_state"]] = study.get(t.user_attrs["sweep_state"], 0) + 1
        print(f"this agent ran {len(self.records)} trials "
              f"({', '.join(f'{n} {k}' for k, n in mine.items()) or 'none'}); the study has "
              f"{len(trials)} ({', '.join(f'{n} {k}' for k, n in study.items()) or 'none'})")
        best = None
        if self.sweep.metric:
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            if done:
                t = (min if self.sweep.goal == "minimize" else max)(done, key=lambda t: t.value)
                best = dict(number=t.number, value=t.value, params=t.user_attrs["sweep_params"],
                            dir=t.user_attrs.get("sweep_dir"))
                print(f"best: trial {t.number}, {self.sweep.metric}={_fmt(t.value)}  "
                      f"({best['dir']})")
                for k, v in _flat(best["params"]).items():
                    print(f"    {k}: {v!r}")
                command = Path(best["dir"] or "", "command.txt")
                if command.is_file():
                    print(f"  command: {command.read_text().strip()}")
        written = write_trials_csv(trials, self.dir / "trials.csv", self.sweep.metric)
        if self.plots and self.sweep.metric:
            written += write_plots(self.study, self.dir, self.sweep.metric)
        if written:
            print("wrote " + ", ".join(str(p) for p in written))
        return SweepResult(self.records, best, reason, exit_code, self.dir, self.study_name)


# --------------------------------------------------------------------------- reports

def _replace_atomically(path: Path, write):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)  # agents sharing the folder never see half a file


def write_trials_csv(trials, path: Path, metric) -> list[Path]:
    rows = []
    for t in trials:
        a = t.user_attrs
        row = {"trial": t.number, "state": a.get("sweep_state"),
               metric or "value": a.get("sweep_value"), "iterations": a.get("sweep_iterations"),
               "exit_code": a.get("sweep_exit_code"), "duration_s": a.get("sweep_duration_s"),
               "started": t.datetime_start.isoformat(timespec="seconds")
               if t.datetime_start else "", "agent": a.get("sweep_agent"),
               "dir": a.get("sweep_dir")}
        for k, v in _flat(a.get("sweep_params", {})).items():
            row[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
        rows.append(row)
    if not rows:
        return []
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
    _replace_atomically(path, write)
    return [path]


def write_plots(study, out_dir: Path, metric: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = {k for t in complete for k in t.params
              if len({json.dumps(u.params.get(k)) for u in complete}) > 1}
    named = {"target_name": metric}
    jobs = [("optimization_history.png", vis.plot_optimization_history, named,
             len(complete) >= 1),
            ("parallel_coordinates.png", vis.plot_parallel_coordinate, named, len(complete) >= 2),
            ("param_importances.png", vis.plot_param_importances, named,
             len(complete) >= 2 and bool(varied)),
            ("intermediate_values.png", vis.plot_intermediate_values, {},
             any(t.intermediate_values for t in study.get_trials(deepcopy=False)))]
    written = []
    for name, plot, kwargs, possible in jobs:
        if not possible:
            print(f"  skipped {name}: not enough finished trials")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study, **kwargs)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(max(fig.get_size_inches()[0], 8), 5)
                fig.tight_layout()
                _replace_atomically(out_dir / name, lambda tmp: fig.savefig(tmp, format="png"))
                plt.close(fig)
            written.append(out_dir / name)
        except Exception as e:  # an optional picture must not fail the sweep
            print(f"  skipped {name}: {e}")
    return written


# --------------------------------------------------------------------------- study

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
        deadline = time.time() + 30  # another agent may be queueing the grid right now
        while "sweep_ready" not in study.user_attrs and time.time() < deadline:
            time.sleep(0.2)
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
        queued = {t.user_attrs.get("sweep_grid_index") for t in study.get_trials(deepcopy=False)}
        for index, point in enumerate(grid):
            if index not in queued:
                study.enqueue_trial(_optuna_grid_params(sweep.params, point),
                                    user_attrs={"sweep_grid_index": index})
    study.set_user_attr("sweep_ready", True)
    return study


def main(argv=None) -> SweepResult:
    parser = argparse.ArgumentParser(
        description="Run a W&B sweep YAML offline with Optuna (like `wandb agent`).")
    parser.add_argument("config", help="sweep YAML (W&B sweep config format)")
    parser.add_argument("--count", type=int, help="trials this agent runs (default: until the "
                        "sweep is done: grid exhausted, run_cap or metric.target reached)")
    parser.add_argument("--study-name", help="Optuna study name (default: the sweep's name or "
                        "the YAML file name)")
    parser.add_argument("--storage", help="Optuna DB URL shared by agents on several machines "
                        "(e.g. postgresql://...), or a journal file path (default: "
                        "<sweep dir>/optuna-journal.log)")
    parser.add_argument("--sweep-dir", help="where trial folders, trials.csv and plots go "
                        "(default: sweeps_runs/<study name>/)")
    parser.add_argument("--seed", type=int, help="sampler seed (give each agent its own)")
    parser.add_argument("--no-plots", action="store_true",
                        help="skip the PNG plots at the end (they take a few seconds)")
    parser.add_argument("--kill-timeout", type=float, default=KILL_TIMEOUT,
                        help="seconds between SIGTERM and SIGKILL when stopping a run")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be >= 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        sweep = load_sweep(args.config)
        study_name = args.study_name or re.sub(r"[^A-Za-z0-9_.-]+", "-", sweep.name)
        sweep_dir = Path(args.sweep_dir or Path("sweeps_runs") / study_name)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        grid = grid_points(sweep.params) if sweep.method == "grid" else None
        sampler = (optuna.samplers.TPESampler(seed=args.seed) if sweep.method == "bayes"
                   else optuna.samplers.RandomSampler(seed=args.seed))
        pruner = (WandbHyperbandPruner(**sweep.hyperband) if sweep.hyperband
                  else optuna.pruners.NopPruner())
        study = open_study(sweep, make_storage(args.storage, sweep_dir), study_name, sampler,
                           pruner, grid)
    except ConfigError as e:
        print(f"sweep config error: {e}", file=sys.stderr)
        raise SystemExit(2)
    agent = Agent(sweep, study, sweep_dir, study_name, count=args.count,
                  kill_timeout=args.kill_timeout, grid=grid, plots=not args.no_plots)

    def on_signal(signum, frame):
        if agent.signal is not None:
            raise KeyboardInterrupt
        agent.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing up (again to force)", flush=True)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread (embedded use): leave signals alone
            pass
    try:
        return agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main().exit_code)
