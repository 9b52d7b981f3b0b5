"""The search space: grid points, values drawn through an Optuna trial, and the run's command line."""
from __future__ import annotations

import itertools
import json
import math
import os
import platform
from statistics import NormalDist

from .schema import DEFAULT_COMMAND, ENVVAR_RE, Param, _is_int

QUANTILE_EPS = 1e-6  # keeps normal/log_normal quantiles finite (about +-4.75 sigma)

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
    # The argument forms (args, args_no_equals, args_json, ...) come from wandb itself.
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    expansions = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    del expansions["args_dict"]  # not a macro
    expansions.update({
        "env": [] if windows else ["/usr/bin/env"],
        "interpreter": ["python"],  # wandb hardcodes "python"; write python3 or a path to differ
        "program": [] if program is None else [str(program)],
    })
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
