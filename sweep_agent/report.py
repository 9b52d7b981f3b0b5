"""What a sweep leaves for people: the summary it prints, trials.csv and Optuna's plots."""
from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .runs import _flat, _fmt
from .schema import _is_int, _is_num


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


LOG_SCALED = ("log_uniform", "log_uniform_values", "q_log_uniform", "q_log_uniform_values", "inv_log_uniform",
              "inv_log_uniform_values", "log_normal", "q_log_normal")
# Finished trials an importance needs per parameter that varied. Measured with Optuna's default (fANOVA) on 6
# uniform parameters of which one alone sets the value: that one got 0.11-0.27 of the importance from 10 trials,
# 0.30-0.95 from 20, 0.88-0.96 from 60 (5 seeds each); with 2 parameters, 0.54-0.67 from 10 and 0.79-1.0 from 20.
IMPORTANCE_TRIALS_PER_PARAMETER = 10
LEGEND_MAX_TRIALS = 12  # more lines than this and a legend only hides the plot


def _distribution(values, log: bool):
    """An Optuna distribution spanning the values a parameter took, or None when it took one value."""
    if len({json.dumps(v, sort_keys=True) for v in values}) < 2:
        return None
    if all(map(_is_num, values)):
        lo, hi, log = min(values), max(values), log and min(values) > 0
        if all(map(_is_int, values)):
            return optuna.distributions.IntDistribution(lo, hi, log=log)
        return optuna.distributions.FloatDistribution(lo, hi, log=log)
    return optuna.distributions.CategoricalDistribution(sorted({_label(v) for v in values}, key=str))


def _label(value) -> str | int | float:
    if _is_num(value):
        return value
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def plot_study(study, sweep):
    """An in-memory copy of the study for plotting, whose parameters are the values the runs got, under W&B's
    names (not what Optuna sampled: x[quantile], batch[raw], layers[index]); parameters that took one value are
    left out. Finished and pruned trials only."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    runs = [(t, _flat(t.user_attrs.get("sweep_params", {}))) for t in trials]
    log = {p.name for p in sweep.params if p.dist in LOG_SCALED}
    names = dict.fromkeys(name for _, params in runs for name in params)
    distributions = {name: _distribution([params[name] for _, params in runs if name in params], name in log)
                     for name in names}
    copy = optuna.create_study(direction=study.direction)
    for t, params in runs:
        kept = {k: distributions[k] for k in params if distributions[k]}
        shown = {k: _label(params[k]) if isinstance(d, optuna.distributions.CategoricalDistribution) else params[k]
                 for k, d in kept.items()}
        copy.add_trial(optuna.trial.create_trial(state=t.state, value=t.value, params=shown, distributions=kept,
                                                 intermediate_values=t.intermediate_values))
    return copy


def _importance_unfit(study) -> str | None:
    """Why a parameter importance would mean nothing here (None when it can be drawn)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = {k for t in complete for k in t.params}
    if len(varied) < 2:
        return f"{len(varied)} parameter(s) took more than one value; an importance compares at least two"
    needed = IMPORTANCE_TRIALS_PER_PARAMETER * len(varied)
    if len(complete) < needed:
        return (f"{len(complete)} finished trials; with {len(varied)} parameters that varied an importance needs "
                f"{needed} ({IMPORTANCE_TRIALS_PER_PARAMETER} per parameter) to mean something")
    return None


def _readable(name, ax, trials):
    """Optuna's figures, made readable: parallel coordinates in a colour map with no white (its Blues drew the
    best trial white on the grey background), no legend of one line per trial past LEGEND_MAX_TRIALS."""
    if name == "parallel_coordinates.png":
        for collection in ax.collections:
            collection.set_cmap("viridis_r" if collection.get_cmap().name.endswith("_r") else "viridis")
    if name == "intermediate_values.png" and len(trials) > LEGEND_MAX_TRIALS and ax.get_legend():
        ax.get_legend().remove()
        ax.set_title(f"{ax.get_title()} ({len(trials)} trials)")


def write_plots(study, sweep, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    shown = plot_study(study, sweep)
    complete = shown.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    named = {"target_name": sweep.metric}
    too_few = f"{len(complete)} finished trial(s)"
    jobs = [("optimization_history.png", vis.plot_optimization_history, named, None if complete else too_few),
            ("parallel_coordinates.png", vis.plot_parallel_coordinate, named,
             None if len(complete) >= 2 else too_few),
            ("param_importances.png", vis.plot_param_importances, named, _importance_unfit(shown)),
            ("intermediate_values.png", vis.plot_intermediate_values, {},
             None if any(t.intermediate_values for t in shown.trials) else "no trial logged intermediate values")]
    written = []
    for name, plot, kwargs, unfit in jobs:
        if unfit:
            print(f"  skipped {name}: {unfit}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(shown, **kwargs)
                ax = ax.flat[0] if hasattr(ax, "flat") else ax
                _readable(name, ax, shown.trials)
                fig = ax.figure
                fig.set_size_inches(max(fig.get_size_inches()[0], 8), 5)
                fig.tight_layout()
                _replace_atomically(out_dir / name, lambda tmp: fig.savefig(tmp, format="png"))
                plt.close(fig)
            written.append(out_dir / name)
        except Exception as e:  # an optional picture must not fail the sweep
            print(f"  skipped {name}: {e}")
    return written


def report(study, sweep, records, out_dir: Path, plots: bool) -> dict | None:
    """Print what this agent and the whole study ran and the best trial; write trials.csv (and the plots).
    Returns the best finished trial of the study (None without a metric or a finished trial)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("sweep_state")]
    mine, everyone = {}, {}
    for r in records:
        mine[r["state"]] = mine.get(r["state"], 0) + 1
    for t in trials:
        everyone[t.user_attrs["sweep_state"]] = everyone.get(t.user_attrs["sweep_state"], 0) + 1
    print(f"this agent ran {len(records)} trials ({', '.join(f'{n} {k}' for k, n in mine.items()) or 'none'}); "
          f"the study has {len(trials)} ({', '.join(f'{n} {k}' for k, n in everyone.items()) or 'none'})")
    best = None
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if sweep.metric and done:
        t = (min if sweep.goal == "minimize" else max)(done, key=lambda t: t.value)
        best = dict(number=t.number, value=t.value, params=t.user_attrs["sweep_params"],
                    dir=t.user_attrs.get("sweep_dir"))
        print(f"best: trial {t.number}, {sweep.metric}={_fmt(t.value)}  ({best['dir']})")
        for k, v in _flat(best["params"]).items():
            print(f"    {k}: {v!r}")
        command = Path(best["dir"] or "", "command.txt")
        if command.is_file():
            print(f"  command: {command.read_text().strip()}")
    written = write_trials_csv(trials, out_dir / "trials.csv", sweep.metric)
    if plots and sweep.metric:
        written += write_plots(study, sweep, out_dir)
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    return best
