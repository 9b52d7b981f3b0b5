"""Checks a sweep YAML against W&B's sweep schema and turns it into a Sweep."""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
from pathlib import Path

import yaml

from .schema import (DEFAULTS, DEFAULT_COMMAND, DISTRIBUTIONS, ENVVAR_RE, GRID_DISTRIBUTIONS, GRID_LIMIT,
                     MACROS, METHODS, PARAM_NAME_RE, TOP_LEVEL_KEYS, ConfigError, Param, Sweep, _is_int, _is_num)
from .space import grid_choices

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
        if importlib.util.find_spec("scipy") is None:
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
