"""What a sweep leaves for people: the summary it prints, trials.csv and Optuna's plots."""
from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

from optuna.trial import TrialState

from .runs import _flat, _fmt

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
        written += write_plots(study, out_dir, sweep.metric)
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    return best
