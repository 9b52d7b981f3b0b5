"""W&B's hyperband early-termination rule, and an Optuna pruner that applies it."""
from __future__ import annotations

import math

import optuna

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
