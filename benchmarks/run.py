"""All benchmarks side by side in one run: the figures go to results.json, the report to RESULTS.md.

    python benchmarks/run.py                    # full run, ~25 minutes on 2 CPU cores; writes benchmarks/
    python benchmarks/run.py --quick            # smoke test for CI, a few minutes; writes outputs/benchmarks-quick/
    python benchmarks/run.py --only mlm,sweep   # rerun some sections, keep the others' figures from results.json
    python benchmarks/run.py --render           # RESULTS.md again from results.json, nothing measured

Sections: mlm (sparse MLM head against the dense head), preprocess (tokenize and pack, ours against the HF
example's), glue (SST-2 padded per batch against padded to 128), t5 (span-corruption collator, batched against
per row), sweep (seconds from a sweep trial's launch to its first step). Quick mode only proves the harness runs:
its figures are not comparable, no target is judged on them, and it leaves out glue unless --only names it.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
for path in (REPO_ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                   "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

SECTIONS = ("mlm", "preprocess", "t5", "sweep", "glue")  # in run order: the long GLUE comparison last
NOT_IN_QUICK = ("glue",)  # minutes even when shrunk; its own tests cover fine_tune_glue.py
# (key in results, target, higher is better, what it means)
TARGETS = [
    ("mlm.speedup", 2.0, True, "MLM: sparse head tokens/s / dense head's"),
    ("mlm.perplexity_gap", 0.02, False, "MLM: perplexity gap, sparse vs dense head"),
    ("glue.speedup", 3.0, True, "GLUE SST-2: per-batch padding / padding to 128, training time"),
    ("glue.accuracy_gap", 0.005, False, "GLUE SST-2: dev accuracy gap"),
    ("preprocess.speedup.None", 2.0, True, "Preprocessing (num_proc None): ours / HF approach"),
    ("preprocess.speedup.2", 2.0, True, "Preprocessing (num_proc 2): ours / HF approach"),
    ("t5.speedup", 3.0, True, "T5 collator: batched / per row (numpy rows, as run_span_t5.py feeds it)"),
    ("sweep.later_trials_max_seconds", 15.0, False, "Sweep: later trials' seconds to first step (slowest)"),
]


def machine():
    import datasets
    import torch
    import transformers

    import throughput

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:  # no git: a copy, not a clone
        commit = None
    return {"commit": commit, "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "bf16_matrix_units": throughput.cpu_has_bf16_matmul(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def section_mlm(quick):
    import mlm_throughput

    return mlm_throughput.run(quick)


def section_preprocess(quick):
    import preprocess

    return preprocess.run(quick)


def section_glue(quick):
    import glue_padding

    result = glue_padding.run(quick)
    return dict(result, accuracy_gap=abs(result["accuracy_delta"]))


def section_t5(quick):
    import t5_collator

    rows = [t5_collator.run(batch=32, input_length=512, repeats=20 if quick else 200, row_format=fmt)
            for fmt in t5_collator.ROW_FORMATS]
    # Judged on numpy rows: what run_span_t5.py gives its collator (the data formatted as "numpy").
    return {"rows": rows, "speedup": next(r["speedup"] for r in rows if r["row_format"] == "numpy")}


def section_sweep(quick):
    import sweep_overhead

    return sweep_overhead.run(quick, trials=2 if quick else 3)


def lookup(results, key):
    value = results
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def judge(results, quick):
    rows = []
    for key, target, higher, meaning in TARGETS:
        value = lookup(results, key)
        if value is None:
            verdict = "not run"
        elif quick:
            verdict = "(quick: not judged)"
        else:
            verdict = "MET" if (value >= target if higher else value <= target) else "MISSED"
        rows.append({"key": key, "meaning": meaning, "target": target, "higher_is_better": higher, "value": value,
                     "verdict": verdict})
    return rows


# ---------------------------------------------------------------------------------------------------
# The report: tables and short findings, rendered from results.json
# ---------------------------------------------------------------------------------------------------

def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def fmt(value, kind):
    if value is None:
        return "-"
    return {"x": f"{value:.2f}x", "pct": f"{100 * value:.2f}%", "s": f"{value:.1f} s",
            "points": f"{100 * value:.2f} points"}.get(kind, f"{value:,.0f}")


def report_targets(data):
    kinds = {"speedup": "x", "accuracy_gap": "points", "gap": "pct", "seconds": "s"}
    rows = []
    for row in data["targets"]:
        kind = next((k for word, k in kinds.items() if word in row["key"]), "")
        sign = ">=" if row["higher_is_better"] else "<="
        rows.append([row["meaning"], f"{sign} {fmt(row['target'], kind)}", fmt(row["value"], kind), row["verdict"]])
    return ["## Targets", ""] + table(["what", "target", "measured", "verdict"], rows)


def report_mlm(r):
    s = r["settings"]
    rows = [[name, fmt(row["tokens_per_second"], ""), ", ".join(f"{t:,.0f}" for t in row["all_tokens_per_second"]),
             fmt(row["mfu"], "pct"), f"{row['perplexity']:.1f}", f"{row['peak_memory_mb']:,.0f}"]
            for name, row in r["rows"].items()]
    return ["## MLM: sparse head against dense head (`mlm_throughput.py`)", "",
            f"{s['model']} at sequence length {s['seq_len']}, batch {s['batch']}, {s['steps']} steps a run, fp32; "
            f"tokenizer: {s['tokenizer']}; corpus: {s['corpus']}. Rounds in turns: {s['rounds']}, the median counts; "
            f"perplexity on {s['eval_samples']} eval blocks after the first round. MFU counts the FLOPs each run "
            "spends, the dense head's on unlabelled positions too.", ""] + table(
        ["run_mlm.py", "tokens/s", "every round", "MFU", "perplexity", "peak MB"], rows) + [
        "", f"Sparse head / dense head tokens/s: {r['speedup']:.2f}x, perplexities {100 * r['perplexity_gap']:.2f}% "
            "apart. The sparse head runs the output layer over 30,522 ids at the ~15% of positions that carry a label "
            "instead of at all of them; the loss is the same."]


def report_preprocess(r):
    rows = [[row["pipeline"], row["num_proc"], fmt(row["seconds"], "s"), fmt(row["cpu_seconds"], "s"),
             f"{row['mb_per_second']:.2f}", row["blocks"], ", ".join(row["columns"]),
             ", ".join(f"{t:.1f}" for t in row["all_seconds"])] for row in r["rows"]]
    speedups = "; ".join(f"num_proc {k}: {v:.2f}x" for k, v in r["speedup"].items())
    return ["## Preprocessing: tokenize and pack (`preprocess.py`)", "",
            f"{r['corpus_mb']:.1f} MB of text that does not repeat ({r['corpus']}); tokenizer: {r['tokenizer']}; "
            f"blocks of {r['block_size']}; rounds in turns: {r['rounds']}, each run a fresh process and cache.", ""] + table(
        ["pipeline", "num_proc", "seconds", "CPU seconds", "MB/s", "blocks", "columns", "every run (s)"], rows) + [
        "", f"HF approach's time / ours: {speedups}. Ours asks the tokenizer for ids only (no character offsets), tokenizes each "
            "distinct space-separated piece once, and cuts blocks in Arrow instead of concatenating Python lists; "
            "it keeps one column instead of four. Ours drops blank lines, so it makes slightly fewer blocks."]


def report_glue(r):
    rows = [[name, fmt(row["train_runtime"], "s"), f"{row['eval_accuracy']:.4f}", fmt(row["eval_runtime"], "s")]
            for name, row in r.items() if isinstance(row, dict)]
    first = next(row for row in r.values() if isinstance(row, dict))
    return ["## GLUE: padding per batch against padding to 128 (`glue_padding.py`)", "",
            f"MiniLM-L6 (../shared) on SST-2: {first['train_samples']} training examples, 1 epoch, batch 32, lr 5e-5, "
            f"seed 42; {first['eval_samples']} dev examples.", ""] + table(
        ["padding", "training", "dev accuracy", "evaluation"], rows) + [
        "", f"Training time padded to 128 / per batch (with length grouping): {r['speedup']:.2f}x; dev accuracy "
            f"per batch minus padded: {100 * r['accuracy_delta']:+.2f} points."]


def report_t5(r):
    rows = [[row["row_format"], row["batch"], f"{row['input_length']} / {row['target_length']}",
             f"{row['vectorized_ms']:.2f}", f"{row['per_row_ms']:.2f}", fmt(row["speedup"], "x")] for row in r["rows"]]
    return ["## T5 span corruption: batched collator against per row (`t5_collator.py`)", ""] + table(
        ["rows as", "batch", "input / target tokens", "batched ms", "per-row ms", "speed-up"], rows) + [
        "", "Both return the same shapes from the same rows; the batched collator draws every row's spans with a "
            "handful of numpy operations over the whole batch. run_span_t5.py reads its rows as numpy arrays (the "
            "target is judged there); from Python lists, converting the lists to arrays takes much of both sides' time."]


def report_sweep(r):
    rows = [[row["trial"], fmt(row["seconds_to_first_step"], "s"), f"{row.get('eval_loss') or 0:.3f}"] for row in r["trials"]]
    return ["## Sweep: seconds from a trial's launch to its first training step (`sweep_overhead.py`)", "",
            f"`python sweep.py` on {r['setup']}.", ""] + table(["trial", "seconds to first step", "eval loss"], rows) + [
        "", f"Importing run_mlm.py alone takes {r['import_seconds']:.1f} s ({r['import_cpu_seconds']:.1f} s CPU). "
            "The first trial trains the tokenizer and tokenizes; later trials load both from the cache."]


REPORTS = {"mlm": report_mlm, "preprocess": report_preprocess, "glue": report_glue, "t5": report_t5, "sweep": report_sweep}


def render(data):
    meta, m = data["meta"], data["meta"]["machine"]
    lines = ["# Benchmark results", "",
             f"Written by `python benchmarks/run.py{' --quick' if meta['quick'] else ''}` on {meta['finished']}"
             + (f" at commit {m['commit']}" if m.get("commit") else "") + f" in "
             f"{meta['minutes']:.0f} minutes; figures in `results.json`. Machine: {m['cpu']}, {m['cores']} cores "
             f"({m['torch_threads']} torch threads), bf16 matrix units: {'yes' if m['bf16_matrix_units'] else 'no'}, "
             f"GPU: {m['gpu'] or 'none'}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
             f"datasets {m['datasets']}. Load average before / after: {meta['load_start']:.1f} / {meta['load_end']:.1f} "
             "(above the core count, runs waited for a CPU: only comparisons taken in turns are meaningful).", ""]
    for rerun in meta.get("reruns", []):
        lines += [f"Rerun with `--only {','.join(rerun['sections'])}` on {rerun['finished']} (load {rerun['load_start']:.1f} "
                  f"/ {rerun['load_end']:.1f}).", ""]
    if meta["quick"]:
        lines += ["**Quick mode: these figures only show that the harness runs.**", ""]
    lines += report_targets(data) + [""]
    number = 0
    for section in SECTIONS:
        result = data["results"].get(section)
        if result is None:
            continue
        number += 1
        if "error" in result:
            lines += [f"## {number}. {section}", "", f"Failed: `{result['error']}`", ""]
        else:
            report = REPORTS[section](result)
            lines += [report[0].replace("## ", f"## {number}. ", 1)] + report[1:] + [""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the harness runs")
    parser.add_argument("--only", default=None, help=f"comma-separated sections to run ({','.join(SECTIONS)})")
    parser.add_argument("--render", action="store_true", help="rewrite RESULTS.md from results.json only")
    parser.add_argument("--out", default=None, help="folder for results.json and RESULTS.md")
    args = parser.parse_args(argv)
    out = args.out or (os.path.join(REPO_ROOT, "outputs", "benchmarks-quick") if args.quick else HERE)
    path = os.path.join(out, "results.json")
    previous = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
    if args.render:
        with open(os.path.join(out, "RESULTS.md"), "w", encoding="utf-8") as f:
            f.write(render(previous))
        return previous
    sections = args.only.split(",") if args.only else [s for s in SECTIONS if not (args.quick and s in NOT_IN_QUICK)]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    results = dict(previous.get("results", {})) if args.only else {}
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    for section in (s for s in SECTIONS if s in sections):
        print(f"== {section}", flush=True)
        section_start = time.perf_counter()
        try:
            results[section] = globals()[f"section_{section}"](args.quick)
        except Exception as err:  # one section's failure must not lose the others' figures
            traceback.print_exc()
            results[section] = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"}
        results[section]["section_seconds"] = round(time.perf_counter() - section_start, 1)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if args.only and "meta" in previous:  # the full run's record stays; this rerun is noted beside it
        meta = dict(previous["meta"], reruns=previous["meta"].get("reruns", []) + [
            {"sections": sections, "finished": now, "load_start": load_start, "load_end": os.getloadavg()[0]}])
    else:
        meta = {"quick": args.quick, "machine": machine(), "load_start": load_start, "load_end": os.getloadavg()[0],
                "finished": now, "minutes": (time.perf_counter() - start) / 60, "sections_run": sections}
    data = {"meta": meta, "results": results}
    data["targets"] = judge(results, args.quick)
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
    with open(os.path.join(out, "RESULTS.md"), "w", encoding="utf-8") as f:
        f.write(render(data))
    for row in data["targets"]:
        print(f"{row['verdict']:>20}  {row['meaning']}: {row['value']}")
    return data


if __name__ == "__main__":
    main()
