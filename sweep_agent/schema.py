"""What a W&B sweep YAML may hold (its keys, methods, distributions, command macros) and the parsed form."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

GRID_LIMIT = 10_000
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
