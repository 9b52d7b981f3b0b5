"""All benchmarks side by side in one run: writes RESULTS.md (with the raw figures) and PNG plots.

    python benchmarks/run.py                      # full run: tens of minutes on 2 CPU cores; writes benchmarks/
    python benchmarks/run.py --quick              # smoke test for CI, a few minutes; writes outputs/benchmarks-quick/
    python benchmarks/run.py --only mlm,sweep     # rerun some sections, keep the others' figures from RESULTS.md
    python benchmarks/run.py --skip glue,t5       # leave sections out

Sections: peak (matrix-multiply FLOP/s, fp32 and bf16), mlm (run_mlm.py throughput, MFU, memory and
perplexity, ours against the Hugging Face approach), profile (torch.profiler of one step), experiments (fixes
tried for MFU), preprocess (tokenize and pack 50 MB), glue (SST-2 padding), t5 (run_span_t5.py throughput and
collator), sweep (seconds from a trial's launch to its first step). Quick mode checks that the harness works;
its figures are not comparable and no target is judged on them.
"""

import os

# As the scripts do, before torch loads: idle OpenMP threads spin briefly, then sleep, so the in-process
# sections (peak, profile, experiments) and the processes started from here run under the scripts' threading.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
for path in (REPO_ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SECTIONS = ("peak", "mlm", "profile", "experiments", "preprocess", "glue", "t5", "sweep")
# The long GLUE comparison last, so the other figures are written early.
RUN_ORDER = ("peak", "mlm", "profile", "experiments", "preprocess", "sweep", "t5", "glue")
# Left out of --quick unless named in --only: minutes each here, and their own tests cover the code.
NOT_IN_QUICK = ("profile", "experiments", "glue")
RAW_BEGIN, RAW_END = "<!-- raw results: begin -->", "<!-- raw results: end -->"

# From the issue: Hugging Face's run_mlm.py on this machine type, and what we aim for.
REFERENCE = {"hf_tokens_per_second": {"fp32": 1650, "bf16": 2500}, "hf_mfu": {"fp32": 0.63, "bf16": 0.21}}
TARGETS = {"mlm_speedup": 2.0, "mfu": 0.50, "perplexity_gap": 0.02, "preprocess_speedup": 2.0, "later_trial_seconds": 15.0,
           "glue_speedup": 3.0, "glue_accuracy_gap": 0.005, "collator_speedup": 3.0, "collator_share": 0.02}


# ---------------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info():
    import datasets
    import torch
    import transformers

    flags = cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_flags": {flag: flag in flags for flag in wanted},
        "torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "omp_wait_policy": (f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" if "OMP_WAIT_POLICY" in os.environ
                            else f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'libgomp default')}"),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset"),
    }


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------

def matmul_rate(dtype, size, layout, seconds, through_fp32=False):
    """FLOP/s of size x size matmuls in a layout: 'NN' a @ b, 'NT' a @ b.T (nn.Linear's forward), 'TN' a.T @ b.
    `through_fp32`: bf16 operands converted to fp32 and multiplied there, the result rounded to bf16 (the
    conversions timed too), as the scripts compute bf16 products on a CPU without bf16 matrix units.
    Returns (FLOP/s, seconds of one matmul)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    a, b = (a.t() if layout[0] == "T" else a), (b.t() if layout[1] == "T" else b)

    import train_utils

    matmul = train_utils._bf16_matmul_through_fp32() if through_fp32 else torch.matmul

    start = time.perf_counter()
    matmul(a, b)  # warm-up
    first = time.perf_counter() - start
    runs, start = 0, time.perf_counter()
    while runs == 0 or time.perf_counter() - start < seconds:
        matmul(a, b)
        runs += 1
    elapsed = time.perf_counter() - start
    return 2 * size**3 * runs / elapsed, max(first, elapsed / runs)


def section_peak(quick, sizes=None, window=None, project_size=2048):
    import torch

    import train_utils

    sizes = sizes or ((512, 1024) if quick else (1024, 2048))
    window = window or (0.5 if quick else 1.5)
    budget = 3.0 if quick else 20.0
    rows = []
    kinds = [("fp32", torch.float32, False), ("bf16", torch.bfloat16, False)]
    if train_utils.bf16_goes_through_fp32(torch.bfloat16, "cpu"):  # the route the scripts take for bf16 here
        kinds.append(("bf16 through fp32", torch.bfloat16, True))
    for dtype_name, dtype, through_fp32 in kinds:
        for layout in ("NN", "NT", "TN"):
            one_matmul = None
            for size in sizes:
                # A slow layout (bf16 a @ b without bf16 units) would take minutes at the larger size.
                if one_matmul is not None and one_matmul * 8 > budget:
                    rows.append({"dtype": dtype_name, "layout": layout, "size": size, "gflops": None,
                                 "note": f"skipped: one matmul would take ~{one_matmul * 8:.0f} s"})
                    continue
                rate, one_matmul = matmul_rate(dtype, size, layout, window, through_fp32)
                rows.append({"dtype": dtype_name, "layout": layout, "size": size, "gflops": rate / 1e9})
    project = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        start = time.perf_counter()
        project[dtype_name] = {"gflops": train_utils.measure_peak_flops(dtype, size=project_size) / 1e9,
                               "seconds": time.perf_counter() - start}
    peaks = {}
    for dtype_name in ("fp32", "bf16"):  # bf16: the better of torch's bf16 GEMM and the route through fp32
        measured = [r["gflops"] for r in rows if r["dtype"].startswith(dtype_name) and r["gflops"]]
        peaks[dtype_name] = max(measured + [project[dtype_name]["gflops"]]) * 1e9
    torch_bf16 = [r["gflops"] for r in rows if r["dtype"] == "bf16" and r["gflops"]]
    return {"rows": rows, "train_utils_measure_peak_flops": project, "peak_flops": peaks,
            "torch_bf16_gemm_gflops": max(torch_bf16) if torch_bf16 else None,
            "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}


def section_mlm(quick, results):
    import mlm_throughput

    peaks = (results.get("peak") or {}).get("peak_flops")
    return mlm_throughput.run(quick, peaks=peaks)


def section_profile(quick):
    import mlm_throughput

    out = {}
    for dtype, batch in (("fp32", 4 if quick else 32), ("bf16", 4 if quick else 32)):
        out[dtype] = mlm_throughput.profile_step(dtype, sparse=True, batch=batch)
    return out


def section_experiments(quick):
    import mlm_throughput

    return {"in_process": mlm_throughput.experiments(quick), "wait_policy": mlm_throughput.wait_policy_ab(quick),
            "malloc": mlm_throughput.malloc_ab(quick)}


def section_preprocess(quick):
    import preprocess

    # num_proc None (no worker pool) is what run_mlm.py does without --preprocessing_num_workers.
    return preprocess.run(quick, num_procs=(1, 2) if quick else (None, 1, 2), breakdown_mb=None if quick else 10)


def section_glue(quick):
    try:
        import glue_padding
    except Exception as err:  # a colleague's module: absent or mid-edit
        return {"skipped": f"benchmarks/glue_padding.py not importable ({type(err).__name__}: {err})"}
    try:
        return {"result": glue_padding.run(quick=quick)}
    except FileNotFoundError as err:
        return {"skipped": str(err)}


def section_t5(quick, results=None, with_training=True):
    import t5_collator

    out = {"collator": t5_collator.run(batch=32, input_length=512, repeats=20 if quick else 200)}
    if not with_training:
        return out
    # A fresh process, as run_span_t5.py's training runs: none of this process's heap or threads.
    # MFU against section 1's peak, as for run_mlm.py (when this run measured it).
    peaks = ((results or {}).get("peak") or {}).get("peak_flops")
    command = [sys.executable, os.path.join(HERE, "t5_train.py"), "--json"] + (["--quick"] if quick else []) \
        + (["--peaks", json.dumps(peaks)] if peaks else [])
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        out["train_skipped"] = f"benchmarks/t5_train.py failed: {done.stderr.strip().splitlines()[-1:]}"
        return out
    out["train"] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def section_sweep(quick):
    import sweep_overhead

    return sweep_overhead.run(quick, trials=2 if quick else 3, steps=2 if quick else 3)


RUNNERS = {
    "peak": lambda quick, results: section_peak(quick),
    "mlm": section_mlm,
    "profile": lambda quick, results: section_profile(quick),
    "experiments": lambda quick, results: section_experiments(quick),
    "preprocess": lambda quick, results: section_preprocess(quick),
    "glue": lambda quick, results: section_glue(quick),
    "t5": lambda quick, results: section_t5(quick, results),
    "sweep": lambda quick, results: section_sweep(quick),
}


# ---------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------

def judge(measured, target, higher_is_better=True):
    if measured is None:
        return "not measured"
    ok = measured >= target if higher_is_better else measured <= target
    return "MET" if ok else "MISSED"


def _mfu_target(row):
    """(measured, verdict) of an MFU target. Judged on the MFU beside the runs (the matmul rate measured next to
    each run or step) where the benchmark measured it; the MFU against the run's peak is shown with it."""
    if not row or row.get("mfu") is None:
        return "n/a", judge(None, TARGETS["mfu"])
    if row.get("mfu_beside") is None:
        return _pct(row["mfu"]), judge(row["mfu"], TARGETS["mfu"])
    return (f"{_pct(row['mfu_beside'])} beside (against the run's peak: {_pct(row['mfu'])})",
            judge(row["mfu_beside"], TARGETS["mfu"]))


def targets(results):
    rows = []
    mlm = results.get("mlm") or {}
    for dtype in ("fp32", "bf16"):
        speedup = (mlm.get("speedup") or {}).get(dtype)
        rows.append((f"MLM throughput, ours vs HF dense head ({dtype})", f">= {TARGETS['mlm_speedup']:.0f}x",
                     _x(speedup), judge(speedup, TARGETS["mlm_speedup"])))
    for dtype in ("fp32", "bf16"):
        ours = next((r for r in mlm.get("rows", []) if r["dtype"] == dtype and r["sparse_mlm_head"]), None)
        rows.append((f"MFU of run_mlm.py ({dtype})", f">= {TARGETS['mfu']:.0%}", *_mfu_target(ours)))
    by_dtype = mlm.get("parity_by_dtype") or {"fp32": mlm.get("parity")}
    for dtype, parity in by_dtype.items():
        gap = parity["relative_difference"] if parity else None
        rows.append((f"Perplexity, ours vs HF head, equal steps and seed ({dtype})", f"within {TARGETS['perplexity_gap']:.0%}",
                     _pct(gap, 2) if gap is not None else "n/a", judge(gap, TARGETS["perplexity_gap"], higher_is_better=False)))
    pre = results.get("preprocess") or {}
    for num_proc, speedup in (pre.get("speedup") or {}).items():
        rows.append((f"Preprocessing {pre.get('corpus_mb', 0):.0f} MB, ours vs HF (num_proc={_proc(num_proc)})",
                     f">= {TARGETS['preprocess_speedup']:.0f}x", _x(speedup), judge(speedup, TARGETS["preprocess_speedup"])))
    glue = (results.get("glue") or {}).get("result") or {}
    rows.append(("GLUE SST-2 training, default padding vs pad to 128", f">= {TARGETS['glue_speedup']:.0f}x",
                 _x(glue.get("speedup")), judge(glue.get("speedup"), TARGETS["glue_speedup"])))
    gap = abs(glue["accuracy_delta"]) if "accuracy_delta" in glue else None
    rows.append(("GLUE SST-2 dev accuracy, default vs pad to 128", f"within {100 * TARGETS['glue_accuracy_gap']:.1f} points",
                 "n/a" if gap is None else f"{100 * gap:.2f} points", judge(gap, TARGETS["glue_accuracy_gap"], higher_is_better=False)))
    t5 = results.get("t5") or {}
    collator = (t5.get("collator") or {}).get("speedup")
    rows.append(("T5 collator, vectorized vs per-row (batch 32, n=512)", f">= {TARGETS['collator_speedup']:.0f}x",
                 _x(collator), judge(collator, TARGETS["collator_speedup"])))
    t5_train = t5.get("train") or {}
    shares = [r["collator_share"] for r in t5_train.get("rows", []) if r.get("collator_share") is not None]
    share = max(shares) if shares else None
    rows.append((f"T5 collation share of a training step (t5-small, batch {t5_train.get('batch')})",
                 f"< {TARGETS['collator_share']:.0%}", _pct(share, 2),
                 judge(share, TARGETS["collator_share"], higher_is_better=False)))
    for row in t5_train.get("rows", []):
        dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(row.get("dtype"), row.get("dtype"))
        rows.append((f"MFU of run_span_t5.py's step (t5-small, {dtype})", f">= {TARGETS['mfu']:.0%}", *_mfu_target(row)))
    sweep = results.get("sweep") or {}
    later = sweep.get("later_trials_max_seconds")
    rows.append(("Sweep: later trials' seconds to first step (slowest)", f"< {TARGETS['later_trial_seconds']:.0f} s",
                 _s(later), judge(later, TARGETS["later_trial_seconds"], higher_is_better=False)))
    return rows


# ---------------------------------------------------------------------------------------------------
# Formatting and plots
# ---------------------------------------------------------------------------------------------------

def _x(value):
    return "n/a" if value is None else f"{value:.2f}x"


def _pct(value, digits=1):
    return "n/a" if value is None else f"{value:.{digits}%}"


def _s(value):
    return "n/a" if value is None else f"{value:.1f} s"


def _proc(num_proc):
    return "None" if num_proc in (None, "null") else num_proc


def _num(value, digits=0):
    return "n/a" if value is None else f"{value:,.{digits}f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def make_plots(results, out_dir):
    """One PNG per section that has figures; returns {section: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}

    def save(fig, name, section):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110, bbox_inches="tight")
        plt.close(fig)
        made[section] = name

    peak = results.get("peak") or {}
    if peak.get("rows"):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        labels, values = [], []
        for row in peak["rows"]:
            if row["gflops"]:
                labels.append(f"{row['dtype']} {row['layout']} {row['size']}")
                values.append(row["gflops"])
        colors = {"fp32": "tab:blue", "bf16": "tab:orange", "bf16 through fp32": "tab:green"}
        ax.barh(labels, values, color=[colors.get(row["dtype"], "tab:gray") for row in peak["rows"] if row["gflops"]])
        ax.set_xscale("log")
        ax.set_xlabel("GFLOP/s (log scale)")
        ax.set_title("Matrix multiply on this CPU: NN a@b, NT a@b.T, TN a.T@b")
        save(fig, "peak.png", "peak")

    mlm = results.get("mlm") or {}
    if mlm.get("rows"):
        dtypes = [d for d in ("fp32", "bf16") if any(r["dtype"] == d for r in mlm["rows"])]
        fig, axes = plt.subplots(1, len(dtypes), figsize=(4.2 * len(dtypes), 3.6), squeeze=False)
        for ax, dtype in zip(axes[0], dtypes):
            rows = [r for r in mlm["rows"] if r["dtype"] == dtype]
            bars = ax.bar([r["variant"] for r in rows], [r["tokens_per_second"] for r in rows],
                          color=["tab:green" if r["sparse_mlm_head"] else "tab:gray" for r in rows])
            for bar, row in zip(bars, rows):
                ax.annotate(f"MFU {row['mfu']:.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
            reference = REFERENCE["hf_tokens_per_second"][dtype]
            ax.axhline(reference, color="tab:red", linestyle="--", linewidth=1)
            ax.annotate(f"issue's HF reference {reference:,}", (0.02, reference), xycoords=("axes fraction", "data"),
                        fontsize=7, color="tab:red", va="bottom")
            ax.set_title(f"run_mlm.py {dtype}, batch {rows[0]['batch']} x {mlm['settings']['seq_len']}")
            ax.set_ylabel("tokens/s")
            ax.tick_params(axis="x", labelsize=8)
        save(fig, "mlm_throughput.png", "mlm")

    profile = results.get("profile") or {}
    if profile and all("shares" in p for p in profile.values()):
        fig, ax = plt.subplots(figsize=(7, 2.6))
        categories = sorted({c for p in profile.values() for c in p["shares"]})
        left = {name: 0.0 for name in profile}
        for category in categories:
            widths = [profile[name]["shares"].get(category, 0.0) for name in profile]
            ax.barh([f"{name} (batch {profile[name]['batch']})" for name in profile], widths,
                    left=[left[name] for name in profile], label=category)
            for name, width in zip(profile, widths):
                left[name] += width
        ax.set_xlabel("share of op time in one training step")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3)
        save(fig, "profile.png", "profile")

    experiments = results.get("experiments") or {}
    rows = [row for key in ("in_process", "wait_policy", "malloc") for row in (experiments.get(key) or {}).get("rows", [])]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
        ax.barh([(f"{r['setting']}, {r['condition']}" if r.get("condition") else r["setting"])[:70] for r in rows],
                [r["tokens_per_second"] for r in rows])
        ax.set_xlabel("tokens/s (BERT-mini, sparse head)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        save(fig, "experiments.png", "experiments")

    pre = results.get("preprocess") or {}
    if pre.get("rows"):
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        procs = list(dict.fromkeys(r["num_proc"] for r in pre["rows"]))
        for offset, name, color in ((-0.2, "ours", "tab:green"), (0.2, "hf", "tab:gray")):
            values = [next(r["seconds"] for r in pre["rows"] if r["num_proc"] == p and r["pipeline"] == name)
                      for p in procs]
            ax.bar([i + offset for i in range(len(procs))], values, width=0.4, color=color,
                   label="ours" if name == "ours" else "HF approach")
        ax.set_xticks(range(len(procs)), [f"num_proc={_proc(p)}" for p in procs])
        ax.set_ylabel("seconds (tokenize + pack)")
        ax.set_title(f"Preprocessing {pre['corpus_mb']:.0f} MB of text")
        ax.legend()
        save(fig, "preprocess.png", "preprocess")

    sweep = results.get("sweep") or {}
    if sweep.get("trials"):
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        trials = sweep["trials"]
        ax.bar([f"trial {t['trial']}" for t in trials], [t["seconds_to_first_step"] for t in trials], color="tab:purple")
        ax.axhline(TARGETS["later_trial_seconds"], color="tab:red", linestyle="--", linewidth=1, label="target for later trials")
        ax.axhline(sweep["import_seconds"], color="black", linestyle=":", linewidth=1, label="import run_mlm.py alone")
        ax.set_ylabel("seconds from launch to first step")
        ax.legend(fontsize=8)
        save(fig, "sweep_overhead.png", "sweep")
    return made


# ---------------------------------------------------------------------------------------------------
# RESULTS.md
# ---------------------------------------------------------------------------------------------------

def render(results, meta, plots):
    quick = meta["quick"]
    machine = meta["machine"]
    lines = [
        "# Benchmarks" + (" (QUICK MODE: smoke figures, not comparable, no target judged)" if quick else ""),
        "",
        f"Written by `python benchmarks/run.py{' --quick' if quick else ''}` on {meta['finished']} "
        f"({meta['minutes']:.0f} min). Rerun a part with `--only SECTION`.",
        "",
        "## Machine",
        "",
        table(["", ""], [
            ("CPU", f"{machine['cpu']}, {machine['cores']} cores, torch uses {machine['torch_threads']} threads"),
            ("CPU features", ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["cpu_flags"].items())),
            ("GPU", machine["gpu"]),
            ("Software", f"torch {machine['torch']}, transformers {machine['transformers']}, datasets "
                         f"{machine['datasets']}, Python {machine['python']}"),
            ("Threads", f"{machine['omp_wait_policy']}, "
                        f"TOKENIZERS_PARALLELISM={machine['tokenizers_parallelism']}"),
            ("Load average (1 min)", f"{meta['load_start'][0]:.1f} at the start, {meta['load_end'][0]:.1f} at the end; "
                                      "per-section figures below"),
        ]),
        "",
        "The machine was shared with other jobs during the run (a load average above the 2 cores means "
        "processes waited for a CPU), so every timing here is noisy and low; the load beside each figure says how "
        "busy the machine was when it was taken. Comparisons within a section ran back to back.",
        "",
    ]
    lines += ["## Targets", ""]
    lines.append(table(["target", "wanted", "measured", "verdict"],
                       [(name, wanted, measured, "(quick)" if quick else verdict)
                        for name, wanted, measured, verdict in targets(results)]))
    lines.append("")
    lines += write_findings(results)
    for section in SECTIONS:
        result = results.get(section)
        if result is not None:
            lines += SECTION_WRITERS[section](result, plots)
    missing = [s for s in SECTIONS if s not in results]
    if missing:
        lines += [f"Not run{' (left out of --quick)' if quick else ''}: {', '.join(missing)}.", ""]
    lines += ["## Raw results", "", "<details><summary>JSON (what `--only` reads back)</summary>", "", RAW_BEGIN,
              "```json", json.dumps({"meta": meta, "results": results}, indent=1, default=str), "```", RAW_END,
              "", "</details>", ""]
    return "\n".join(lines)


def _ok(result):
    return isinstance(result, dict) and "error" not in result and "skipped" not in result


def _experiment_rows(exp):
    """The in-process experiments' rows (one per setting), or [] when that section did not run."""
    return ((exp or {}).get("in_process") or {}).get("rows", []) if _ok(exp) else []


def _cpu_dropout_ran(exp):
    rows = _experiment_rows(exp)
    return any("CPU dropout" in r["setting"] for r in rows)


def _dropout_fix_note(exp):
    """The CPU-dropout fix, from the experiments' rows with torch's dropout against the scripts' steps."""
    rows = _experiment_rows(exp)
    parts = []
    for dtype in ("fp32", "bf16"):
        scripts = next((r for r in rows if r["dtype"] == dtype and ("baseline" in r["setting"] or "(the scripts" in r["setting"])), None)
        torch_dropout = next((r for r in rows if r["dtype"] == dtype and "torch's dropout" in r["setting"]), None)
        if scripts and torch_dropout:
            parts.append(f"{dtype} {torch_dropout['step_seconds']:.3f} s per step with torch's dropout, "
                         f"{scripts['step_seconds']:.3f} s with the scripts' "
                         f"({torch_dropout['step_seconds'] / scripts['step_seconds']:.2f}x)")
    if not parts:
        return None
    return ("**Dropout on a CPU.** torch's CPU dropout draws a Bernoulli number per element in the input's dtype "
            "(12 ms for the 2M attention probabilities of one BERT-mini layer at batch 32, timed by hand) and saves "
            "a scaled noise tensor for backward. When training on a CPU the scripts draw one 32-bit random number per "
            "two elements and keep 15 bits of each (p rounded to 1/32768), save the mask as bytes, and run "
            "attention's softmax, dropout and value product themselves, where SDPA has no fused CPU kernel for "
            "dropout anyway (`train_utils.use_cpu_dropout`; same seed, same masks; not torch's masks). In turns, "
            "same process, batch 32: " + "; ".join(parts) + ".")


def _bf16_native_note(profile, peak, ours, mlm, exp):
    """bf16 on a CPU whose bf16 matmuls run on bf16 units (AVX512-BF16 or AMX): where the step's time goes."""
    rates = peak.get("peak_flops", {})
    shares = profile["shares"]
    text = (f"This CPU multiplies bf16 on its own units (AVX512-BF16; oneDNN): {rates.get('bf16', 0) / 1e9:.0f} GFLOP/s "
            f"against {rates.get('fp32', 0) / 1e9:.0f} in fp32 (section 1), so the scripts use torch's bf16 kernels "
            "as they are. MFU divides by that bf16 rate, so a bf16 step has to run "
            f"{rates.get('bf16', 1) / max(rates.get('fp32', 1), 1):.1f}x faster than fp32 for the same MFU, and only "
            "the matrix multiplies get faster: elementwise work (GELU, LayerNorm, softmax, residual adds) runs at "
            "memory speed, and autocast adds casts of every weight and of activations between fp32 and bf16. In the "
            f"profiled bf16 step (batch {profile['batch']}) matmuls take {shares.get('matmul', 0):.0%} of the op "
            f"time, elementwise and other ops {shares.get('elementwise and other', 0):.0%}, dtype casts and copies "
            f"{shares.get('dtype casts / copies', 0):.0%}, drawing dropout masks {shares.get('dropout RNG', 0):.0%}, "
            f"the optimizer {shares.get('optimizer', 0):.0%}. The issue's figures for HF's run_mlm.py here (~63% MFU in "
            "fp32, ~21% in bf16) fit this picture: the same work outside the matmuls, torch's per-element dropout "
            "draws among it, is a small share of an fp32 step and a large one of a bf16 step.")
    rows = _experiment_rows(exp)
    base = next((r for r in rows if r["dtype"] == "bf16" and "(the scripts" in r["setting"]), None)
    others = [r for r in rows if r["dtype"] == "bf16" and r is not base]
    if base and others:
        text += (" Other bf16 settings against the scripts' step (in turns, same process): " + "; ".join(
            f"{r['setting']}: {base['step_seconds'] / r['step_seconds']:.2f}x the speed" for r in others) + ".")
    if "fp32" in ours and "bf16" in ours and not mlm["settings"].get("in_process"):
        text += (f" Peak memory: {ours['bf16']['peak_memory_mb']:,.0f} MB in bf16 against "
                 f"{ours['fp32']['peak_memory_mb']:,.0f} MB in fp32; bf16 ran "
                 f"{ours['bf16']['tokens_per_second'] / ours['fp32']['tokens_per_second']:.2f}x the fp32 tokens/s.")
    return text


def write_findings(results):
    """What the profiles and experiments say, as sentences built from this run's figures."""
    notes = []
    mlm, profile, exp = results.get("mlm"), results.get("profile"), results.get("experiments")
    peak = results.get("peak")
    ours = {r["dtype"]: r for r in mlm["rows"] if r["sparse_mlm_head"]} if _ok(mlm) else {}
    if _ok(profile) and "fp32" in profile:
        p = profile["fp32"]
        shares = p["shares"]
        implied = ""
        if "fp32" in ours and shares.get("matmul"):
            implied = (f" MFU / matmul share = {ours['fp32']['mfu'] / shares['matmul']:.0%}: roughly how close the "
                       "matmuls themselves come to the measured peak (profile and throughput come from different "
                       "steps, so this is approximate); the gap to 100% MFU is mostly the elementwise time.")
        notes.append(
            f"**fp32 MFU ({_pct(ours['fp32']['mfu']) if 'fp32' in ours else 'n/a'}).** In one profiled step "
            f"(batch {p['batch']}), matrix multiplies take {shares.get('matmul', 0):.0%} of the op time; the rest is "
            f"elementwise work that does no counted FLOPs: {shares.get('elementwise and other', 0):.0%} elementwise "
            f"and other ops (GELU, LayerNorm, softmax, residual adds, their backward), {shares.get('dropout RNG', 0):.0%} "
            f"drawing dropout masks, {shares.get('dtype casts / copies', 0):.0%} copies, {shares.get('optimizer', 0):.0%} "
            "the fused AdamW update. Training with dropout also keeps SDPA off its fused CPU kernel (flash attention "
            "on CPU takes no dropout), so attention runs as separate matmul, softmax and dropout ops"
            + (" (the scripts' own, with train_utils.use_cpu_dropout's masks)." if _cpu_dropout_ran(exp) else ".")
            + implied)
        dropout_note = _dropout_fix_note(exp)
        if dropout_note:
            notes.append(dropout_note)
    if _ok(exp):
        inproc = {r["setting"]: r for r in _experiment_rows(exp)}
        base = next((r for k, r in inproc.items() if k.startswith("fp32 baseline")), None)
        if base:
            changes = []
            for key, r in inproc.items():
                if r["dtype"] == "fp32" and r is not base and r["batch"] in (base["batch"], 2 * base["batch"]):
                    changes.append(f"{key}: {r['tokens_per_second'] / base['tokens_per_second']:.2f}x")
            notes.append("**Fixes tried (fp32 tokens/s relative to the baseline step, same process, in turns):** "
                         + "; ".join(changes) + ". Differences of a few percent are inside this machine's noise. "
                         "torch.compile (the Trainer's --torch_compile) was tried by hand: about 4 minutes of "
                         "compilation and no faster step at this size.")
        policy = (exp.get("wait_policy") or {}).get("rows", [])
        kinds = {"default": "libgomp default", "passive": "PASSIVE", "spin": "GOMP_SPINCOUNT"}
        by = {(r.get("condition", "alone"), kind): r["step_seconds"] for r in policy
              for kind, tag in kinds.items() if tag in r["setting"]}
        parts, ratios = [], {}
        for condition in dict.fromkeys(r.get("condition", "alone") for r in policy):
            default, passive, spin = (by.get((condition, kind)) for kind in kinds)
            if default and spin:
                ratios[condition] = default / spin
                parts.append(f"{condition}: libgomp's default {default:.2f} s per step, GOMP_SPINCOUNT=10000 "
                             f"{spin:.2f} s ({default / spin:.2f}x)"
                             + (f", PASSIVE {passive:.2f} s ({default / passive:.2f}x)" if passive else ""))
        if parts:
            alone = ratios.get("alone")
            cost = ("" if alone is None else
                    f" On an idle machine the short spin cost {1 / alone - 1:.0%} per step in this run." if alone < 0.97
                    else " On an idle machine it made no measurable difference in this run.")
            notes.append(
                "**OpenMP's wait policy** (a fresh process per run, in turns): " + "; ".join(parts) + ". By default "
                "a torch thread that finished its share of a parallel region spins (300,000 iterations), waiting "
                "for the next one; when another job shares the cores, the spinning takes the CPU from the thread "
                "still working (or from the other job), and every region waits for its slowest thread. PASSIVE "
                "threads sleep at once and must be woken for the next region, which costs steps made of many "
                "small regions; a short spin "
                "keeps the quick hand-over and still yields the cores." + cost + " All three scripts set "
                "GOMP_SPINCOUNT=10000 before torch loads unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is already "
                "set; all figures above include it.")
    malloc = (exp.get("malloc") or {}).get("rows", []) if _ok(exp) else []
    if len(malloc) == 2:
        default, keep = malloc
        notes.append(
            f"**Memory the allocator hands back** (fresh processes, in turns): with glibc's default settings a step "
            f"took {default['step_seconds']:.2f} s with {default['page_faults_per_step']:,.0f} page faults and "
            f"{default['system_seconds_per_step']:.2f} CPU s in the kernel; keeping freed memory for reuse, "
            f"{keep['step_seconds']:.2f} s ({default['step_seconds'] / keep['step_seconds']:.2f}x), "
            f"{keep['page_faults_per_step']:,.0f} faults, {keep['system_seconds_per_step']:.2f} s, for a peak RSS of "
            f"{keep['peak_rss_mb']:,.0f} MB against {default['peak_rss_mb']:,.0f}. glibc serves each large block "
            "with its own mmap and unmaps it when freed, and trims its heap; a training step frees and re-allocates "
            "the same tensors every time, so each step faulted them back in as fresh zeroed pages. The scripts turn "
            "glibc's mmap and trimming off before training on a CPU (train_utils.keep_freed_memory_for_reuse; a "
            "MALLOC_* or GLIBC_TUNABLES variable leaves them alone), so every training figure in this file includes it.")
    if _ok(profile) and "bf16" in profile:
        p = profile["bf16"]
        fp32_rate = (peak or {}).get("peak_flops", {}).get("fp32") if _ok(peak) else None
        bf16_rate = (peak or {}).get("peak_flops", {}).get("bf16") if _ok(peak) else None
        torch_rate = (peak or {}).get("torch_bf16_gemm_gflops") if _ok(peak) else None
        text = f"**bf16 ({_pct(ours['bf16']['mfu']) if 'bf16' in ours else 'n/a'} MFU).** "
        if (peak or {}).get("mkldnn_bf16") and _ok(peak):
            notes.append(text + _bf16_native_note(p, peak, ours, mlm, exp))
            text = None
        if text is not None:
            if torch_rate and fp32_rate:
                text += (f"This CPU has no AVX512-BF16 or AMX, so torch's bf16 GEMM is ATen's portable kernel: "
                         f"{torch_rate:.1f} GFLOP/s at best against {fp32_rate / 1e9:.1f} in fp32, and below 1 GFLOP/s for "
                         "`a @ b` with both operands row-major (section 1's NN rows), the layout autograd runs for a "
                         "Linear's input gradient `grad @ W`. ")
            inproc = _experiment_rows(exp)
            torch_gemm = next((r for r in inproc if r["setting"].startswith("bf16 with torch's bf16 GEMM")), None)
            route_small = next((r for r in inproc if r["setting"].startswith("bf16 through fp32 (batch")), None)
            route = next((r for r in inproc if r["setting"].startswith("bf16 through fp32 (the scripts")), None)
            f32_small = next((r for r in inproc if r["setting"].startswith("fp32 (batch")), None)
            f32 = next((r for r in inproc if r["setting"].startswith("fp32 baseline")), None)
            if torch_gemm and f32_small:
                text += (f"With it a bf16 step (batch {torch_gemm['batch']}) took {torch_gemm['step_seconds']:.2f} s, "
                         f"{torch_gemm['step_seconds'] / f32_small['step_seconds']:.0f}x the fp32 step: the reason bf16 "
                         "MFU was so low here. ")
            text += ("The scripts therefore compute bf16 linear layers through fp32 on such a CPU "
                     "(`train_utils.bf16_through_fp32`: bf16 operands and results, fp32 products and accumulation, "
                     "the rounding a bf16 GEMM with fp32 accumulation gives; weights and saved format untouched)")
            if torch_gemm and route_small:
                text += f": {torch_gemm['step_seconds'] / route_small['step_seconds']:.1f}x faster at batch {route_small['batch']}"
            if route and f32:
                text += (f", and at batch {route['batch']} {route['step_seconds']:.2f} s per step against "
                         f"{f32['step_seconds']:.2f} s in fp32")
            text += (". SDPA attention goes the same way (q, k, v and the mask in fp32, the output rounded to bf16): "
                     "timed by hand on this machine, not in this run, the backward of torch's fused CPU attention took "
                     "5x its fp32 time in bf16 (40 ms against 8 for a T5 cross-attention, 114 queries over 512 keys), "
                     "about 10% of a T5-small bf16 step.")
            if bf16_rate:
                text += (f" bf16 MFU divides by that route's rate ({bf16_rate / 1e9:.1f} GFLOP/s, section 1), the fastest "
                         "bf16 multiply this machine has.")
            text += (f" In the profiled bf16 step (batch {p['batch']}) matmuls take {p['shares'].get('matmul', 0):.0%} of "
                     f"the op time and dtype casts and copies {p['shares'].get('dtype casts / copies', 0):.0%}: autocast "
                     "and the route convert every weight and activation between fp32 and bf16, work fp32 training does "
                     "not have, so bf16 stays below fp32 on this CPU.")
            if "fp32" in ours and "bf16" in ours and not mlm["settings"].get("in_process"):
                text += (f" Peak memory: {ours['bf16']['peak_memory_mb']:,.0f} MB in bf16 against "
                         f"{ours['fp32']['peak_memory_mb']:,.0f} MB in fp32. bf16 pays off with bf16 matrix units "
                         "(AVX512-BF16, AMX, or a GPU); on this CPU train in fp32.")
            notes.append(text)
    pre = results.get("preprocess")
    if _ok(pre) and pre.get("breakdown"):
        steps = pre["breakdown"]["cpu_seconds"]
        rust = next((v for k, v in steps.items() if k.startswith("Rust tokenizer alone")), None)
        fast = next((v for k, v in steps.items() if k.startswith("Rust tokenizer without")), None)
        pieces = next((v for k, v in steps.items() if k.startswith("data_utils.TokenIds")), None)
        share = steps.get("share of pieces tokenized")
        distinct_mb = steps.get("distinct text: MB")
        distinct_rust = next((v for k, v in steps.items() if k.startswith("distinct text: Rust")), None)
        distinct_ours = next((v for k, v in steps.items() if k.startswith("distinct text: data_utils")), None)
        ours_cpu = next((v for k, v in steps.items() if k.startswith("ours")), None)
        hf_cpu = sum(v for k, v in steps.items() if k.startswith("HF"))
        if rust and ours_cpu:
            text = (f"**Preprocessing.** On {pre['breakdown']['size_mb']:.0f} MB in one process: the Rust tokenizer "
                    f"alone needs {rust:.1f} CPU s through `encode_batch` (what `tokenizer(...)` calls; it computes "
                    "character offsets and drops them)"
                    + (f" and {fast:.1f} s through `encode_batch_fast` (no offsets)" if fast else "")
                    + (f", and {pieces:.1f} s through `data_utils.TokenIds`. BERT's normalizer works character by "
                       "character and its pre-tokenizer splits at every space, so a text's ids are its "
                       "space-separated pieces' ids joined; TokenIds tokenizes each distinct piece once, with the "
                       f"tokenizer itself, and looks it up after that ({share:.1%} of the pieces here were new; the "
                       "same ids, the tests check it)" if pieces is not None and share is not None else "")
                    + f". Ours (TokenIds and Arrow packing in the same map call, then the cache save) takes "
                    f"{ours_cpu:.1f} CPU s; the HF approach {hf_cpu:.1f} "
                    f"({hf_cpu / ours_cpu:.2f}x): offsets computed, three extra columns converted to Python lists and "
                    "stored, and group_texts concatenating and slicing Python lists."
                    + (f" The corpus repeats its sources, so after the first copy nearly every piece is known, which "
                       f"flatters TokenIds: on the sources once ({distinct_mb:.1f} MB, nothing known at the start) "
                       f"it took {distinct_ours:.2f} CPU s against {distinct_rust:.2f} for `encode_batch_fast` "
                       f"({distinct_rust / distinct_ours:.2f}x); the share of new pieces falls as a corpus grows."
                       if distinct_ours and distinct_rust else "")
                    + (" With num_proc 1 or 2, `datasets` runs the tokenizer single-threaded in each worker, so the "
                       "wall times above follow CPU time." if pieces else ""))
            notes.append(text)
    sweep = results.get("sweep")
    if _ok(sweep):
        later = sweep.get("later_trials_max_seconds")
        notes.append(
            f"**Sweep overhead.** The slowest later trial reached its first step after {_s(later)}, the first "
            f"after {_s(sweep['first_trial_seconds'])}; importing run_mlm.py alone took {sweep['import_seconds']:.1f} s "
            + (f"({sweep['import_cpu_seconds']:.1f} s of CPU) " if sweep.get("import_cpu_seconds") else "")
            + "of that, at load ~{:.0f}. Later trials load the cached tokenizer and tokenized data instead of "
              "building them; what remains is that import (torch, transformers' Trainer: a floor no cache removes), "
              "building the model and Trainer, and the first step itself.".format(sweep["load_before"]))
    if not notes:
        return []
    return ["## What the profiles show", ""] + [n + "\n" for n in notes]


def _error_block(result):
    if result and "error" in result:
        return [f"**This section failed:** `{result['error'].strip().splitlines()[-1]}`", "",
                "<details><summary>traceback</summary>", "", "```", result["error"], "```", "</details>", ""]
    return None


def _image(plots, section):
    return [f"![{section}]({plots[section]})", ""] if section in plots else []


def write_peak(result, plots):
    lines = ["## 1. Peak: matrix-multiply throughput", ""]
    if (error := _error_block(result)) is not None:
        return lines + error
    rows = [(r["dtype"], r["layout"], r["size"], _num(r["gflops"], 2) if r["gflops"] else r.get("note", ""))
            for r in result["rows"]]
    lines += [table(["dtype", "layout", "n", "GFLOP/s"], rows), ""]
    project = result["train_utils_measure_peak_flops"]
    lines += [
        f"Peak used for MFU below (best of the table and of `train_utils.measure_peak_flops`): "
        f"**fp32 {result['peak_flops']['fp32'] / 1e9:.1f} GFLOP/s, bf16 {result['peak_flops']['bf16'] / 1e9:.2f} "
        f"GFLOP/s** ({result['threads']} threads, load {result['load']:.1f}). `train_utils.measure_peak_flops` "
        f"(n x n, the better of `a @ b.T` and `a.T @ b`), what the live `train/mfu` divides by: fp32 {project['fp32']['gflops']:.1f}, "
        f"bf16 {project['bf16']['gflops']:.2f} GFLOP/s, measured in {project['fp32']['seconds']:.1f} s and "
        f"{project['bf16']['seconds']:.1f} s.",
        "",
        "Layouts: NN `a @ b` (both row-major; what autograd runs for a Linear's input gradient), NT `a @ b.T` "
        "(nn.Linear's forward), TN `a.T @ b` (the weight gradient). In fp32 all three run alike; in bf16 NN is "
        "tens of times slower than NT/TN on this CPU. It has no AVX512-BF16 or AMX, so oneDNN turns bf16 "
        "matmuls down (`torch.ops.mkldnn._is_mkldnn_bf16_supported()` is "
        f"{result.get('mkldnn_bf16', 'n/a')}) and ATen's portable bf16 GEMM runs instead, converting to fp32 "
        "inside its loops; its NN loop is the slow one.",
        "",
    ]
    if any(r["dtype"] == "bf16 through fp32" for r in result["rows"]):
        lines += [
            "'bf16 through fp32': bf16 operands converted to fp32, multiplied by the fp32 GEMM, the result rounded "
            "to bf16, the conversions timed with it. That is what a bf16 GEMM with fp32 accumulation computes, and "
            "how the scripts compute bf16 products on a CPU without bf16 matrix units "
            "(`train_utils.bf16_through_fp32`), so it is this machine's bf16 peak: the fastest way it has "
            "to multiply bf16 matrices"
            + (f" (torch's own bf16 GEMM: {result['torch_bf16_gemm_gflops']:.1f} GFLOP/s at best)"
               if result.get("torch_bf16_gemm_gflops") else "") + ".",
            "",
        ]
    return lines + _image(plots, "peak")


def write_mlm(result, plots):
    lines = ["## 2. Training throughput and MFU: run_mlm.py, ours against the Hugging Face approach", ""]
    if (error := _error_block(result)) is not None:
        return lines + error
    s = result["settings"]
    lines += [
        f"{s['model']} (4 layers, width 256), tokenizer: {s['tokenizer']}; corpus: {s['corpus']}; sequence "
        f"{s['seq_len']}, batch {s['batch']}"
        + (f" (bf16: {s['bf16_batch']})" if s.get("bf16_batch", s["batch"]) != s["batch"] else "")
        + (f"; {s['fp32_steps']} steps each" if s["fp32_steps"] == s["bf16_steps"]
           else f"; fp32 runs {s['fp32_steps']} steps, bf16 runs {s['bf16_steps']}")
        + f"; tokens/s over the steps after the first {s['warmup']} (total tokens / "
        "total time), read from the Trainer's log history (`tokens_per_second`, one log per step). Each variant "
        "is its own `python run_mlm.py` process; the only differences are `--sparse_mlm_head` and `--bf16`."
        + (f" {s['rounds']} rounds, the four runs in turns in each; the table shows the median round of each variant "
           "(every round's tokens/s in the last column), perplexity and eval from the first round, peak memory the "
           "highest of the rounds." if s.get("rounds", 1) > 1 else ""),
        "",
        "MFU = tokens/s x FLOPs per token / peak. FLOPs per token: `train_utils.transformer_flops_per_token` = "
        "6 x non-embedding weights + 12 x layers x width x sequence (attention; Kaplan et al. 2020 Table 1, "
        "PaLM App. B) + 6 x width x vocabulary x share of positions through the output layer (0.15 for the "
        "sparse head, 1.0 for the dense one). So the HF variant is credited with the FLOPs it actually spends on "
        "the 85% of positions without a label. Peak: section 1. 'logged MFU' is the Trainer's live `train/mfu`. "
        "'MFU beside' divides by the matmul rate measured (`train_utils.measure_peak_flops`, 0.5 s) right before "
        "and right after each run instead, the median over rounds: this machine is shared, and a run in a busy "
        "stretch reads low against the run's quietest moment although its code used the cores it had as well.",
        "",
    ]
    rows = []
    for r in result["rows"]:
        rows.append((r["dtype"], r["variant"], _num(r["tokens_per_second"]), _num(r["best_step_tokens_per_second"]),
                     f"{r['flops_per_token'] / 1e6:.1f}M", _num(r["achieved_gflops"], 1), _pct(r["mfu"]),
                     _pct(r.get("mfu_beside")), _pct(r["logged_mfu"]), _num(r["peak_memory_mb"]), _num(r["perplexity"], 1),
                     f"{r['load_before']:.1f} / {r['load_after']:.1f}",
                     ", ".join(_num(t) for t in r.get("all_tokens_per_second", [r["tokens_per_second"]]))))
    lines += [table(["dtype", "variant", "tokens/s", "best step tokens/s", "FLOPs/token", "GFLOP/s", "MFU",
                     "MFU beside", "logged MFU", "peak memory MB", "eval perplexity", "load before / after",
                     "tokens/s of each round"], rows), ""]
    if any(r.get("all_peak_beside_gflops") for r in result["rows"]):
        lines += ["Matmul rate beside each round's run, GFLOP/s (the mean of before and after): " + "; ".join(
            f"{r['dtype']} {r['variant']} {', '.join(f'{g:.1f}' for g in r['all_peak_beside_gflops'])}"
            for r in result["rows"] if r.get("all_peak_beside_gflops")) + ".", ""]
    speed = result.get("speedup") or {}
    lines.append("Speed-up of ours over the HF head: " + ", ".join(f"{d} {_x(v)}" for d, v in speed.items()) + ".")
    ref = REFERENCE["hf_tokens_per_second"]
    lines.append(f"The issue's reference for HF's run_mlm.py on this machine type: {ref['fp32']:,} tokens/s fp32, "
                 f"{ref['bf16']:,} bf16 (MFU ~{REFERENCE['hf_mfu']['fp32']:.0%} / ~{REFERENCE['hf_mfu']['bf16']:.0%}).")
    hf = {r["dtype"]: r for r in result["rows"] if not r["sparse_mlm_head"]}
    if hf:
        lines.append("Measured here for the HF approach: " + ", ".join(
            f"{d} {_num(r['tokens_per_second'])} tokens/s (MFU {_pct(r['mfu'])})" for d, r in hf.items()) + ".")
        peaks = result.get("peaks") or {}
        if "bf16" in hf and peaks.get("bf16"):
            needed = ref["bf16"] * hf["bf16"]["flops_per_token"]
            lines.append(f"HF's dense head at {ref['bf16']:,} bf16 tokens/s would take {needed / 1e9:.0f} GFLOP/s, "
                         f"{needed / peaks['bf16']:.1f}x the best bf16 matmul rate measured here.")
    lines.append("")
    by_dtype = result.get("parity_by_dtype") or ({"fp32": result["parity"]} if result.get("parity") else {})
    for dtype, parity in by_dtype.items():
        lines += [f"Perplexity parity ({dtype}, same seed, data and {parity['steps']} steps, eval on "
                  f"{parity['eval_samples']} blocks of the eval file): ours {parity['ours']:.2f}, HF head "
                  f"{parity['hf']:.2f}, difference {parity['relative_difference']:.3%}."]
    if by_dtype:
        lines += ["The sparse head computes the same loss (cross-entropy over the masked positions only), so the "
                  "two differ only by floating-point summation order (and, in bf16, by where it rounds).", ""]
    return lines + _image(plots, "mlm")


def write_profile(result, plots):
    lines = ["## Profile of one training step (torch.profiler, ours, after one warm-up step)", ""]
    if (error := _error_block(result)) is not None:
        return lines + error
    for dtype, p in result.items():
        shares = ", ".join(f"{name} {share:.0%}" for name, share in p["shares"].items())
        lines += [f"**{dtype}**, batch {p['batch']}: step {p['step_seconds']:.2f} s (load {p['load']:.1f}); "
                  f"op time by kind: {shares}.", ""]
        lines += [table(["op", "calls", "self s", "share"],
                        [(o["op"], o["calls"], f"{o['self_seconds']:.3f}", f"{o['share']:.1%}") for o in p["top_ops"]]), ""]
        if p.get("matmuls"):
            lines += ["Slowest matmul shapes (the layout is not recorded; backward's input gradients are the "
                      "`[rows, out] @ [out, in]` ones):", ""]
            lines += [table(["op", "shapes", "calls", "self s", "GFLOP/s"],
                            [(m["op"], m["shapes"], m["calls"], f"{m['self_seconds']:.3f}", f"{m['gflops']:.2f}")
                             for m in p["matmuls"]]), ""]
    return lines + _image(plots, "profile")


def write_experiments(result, plots):
    lines = ["## Fixes tried for MFU", ""]
    if (error := _error_block(result)) is not None:
        return lines + error
    inproc, policy = result.get("in_process") or {}, result.get("wait_policy") or {}
    if inproc:
        lines += [f"One process, settings taken in turns ({inproc['rounds']} rounds, median step; load "
                  f"{inproc['load']:.1f} at the end). Same step as the Trainer's: forward with the sparse head, "
                  "backward, fused AdamW.", ""]
        lines += [table(["setting", "batch", "s/step", "tokens/s", "GFLOP/s"],
                        [(r["setting"], r["batch"], f"{r['step_seconds']:.2f}", _num(r["tokens_per_second"]),
                          _num(r["achieved_gflops"], 1)) for r in inproc["rows"]]), ""]
    if policy:
        lines += [f"OpenMP wait policy, fresh process each, in turns ({policy['rounds']} rounds, batch "
                  f"{policy['batch']}, load {policy['load']:.1f}):", ""]
        lines += [table(["condition", "setting", "s/step (median)", "tokens/s", "all runs s"],
                        [(r.get("condition", "alone"), r["setting"], f"{r['step_seconds']:.2f}", _num(r["tokens_per_second"]),
                          ", ".join(f"{v:.2f}" for v in r["all"])) for r in policy["rows"]]), ""]
    malloc = result.get("malloc") or {}
    if malloc:
        lines += [f"glibc malloc settings, fresh process each, in turns ({malloc['rounds']} rounds of {malloc['steps']} "
                  f"timed steps, batch {malloc['batch']}, load {malloc['load']:.1f}); page faults and kernel CPU "
                  "seconds are per timed step:", ""]
        lines += [table(["setting", "s/step (median)", "tokens/s", "page faults", "kernel CPU s", "peak RSS MB", "all runs s"],
                        [(r["setting"], f"{r['step_seconds']:.2f}", _num(r["tokens_per_second"]),
                          _num(r["page_faults_per_step"]), f"{r['system_seconds_per_step']:.3f}", _num(r["peak_rss_mb"]),
                          ", ".join(f"{v:.2f}" for v in r["all"])) for r in malloc["rows"]]), ""]
    return lines + _image(plots, "experiments")


def write_preprocess(result, plots):
    lines = ["## 3. Preprocessing: tokenize and pack", ""]
    if (error := _error_block(result)) is not None:
        return lines + error
    rounds = result.get("rounds", 1)
    lines += [f"{result['corpus_mb']:.0f} MB ({result['corpus']}, repeated), tokenizer: {result['tokenizer']}, "
              f"blocks of {result['block_size']}; each run in a fresh cache folder (nothing reused) and, from this "
              f"version on, a fresh Python process with TOKENIZERS_PARALLELISM={result['tokenizers_parallelism']}, "
              "as a user's run starts. With num_proc None the Rust tokenizer then uses both cores in the calling "
              "process; with num_proc 1 or 2 `datasets` sets TOKENIZERS_PARALLELISM=false for its workers, so each "
              f"worker tokenizes on one core. {rounds} round(s), the pipelines in turns; seconds are the median "
              "run, all runs in the last column. Ours includes saving the result to the cache that the next run "
              "loads.", ""]
    lines += [table(["pipeline", "num_proc", "seconds", "CPU seconds", "MB/s", "blocks", "columns", "load before / after",
                     "runs s"],
                    [("ours" if r["pipeline"] == "ours" else "HF approach", _proc(r["num_proc"]), f"{r['seconds']:.1f}",
                      _num(r.get("cpu_seconds"), 1), f"{r['mb_per_second']:.2f}", _num(r["blocks"]), ", ".join(r["columns"]),
                      f"{r['load_before']:.1f} / {r['load_after']:.1f}",
                      ", ".join(f"{x:.1f}" for x in r.get("all_seconds", [r["seconds"]]))) for r in result["rows"]]), ""]
    cpu = result.get("cpu_speedup") or {}
    lines.append("Speed-up of ours (wall time; CPU time in brackets, which the other jobs disturb less): " +
                 ", ".join(f"num_proc={_proc(p)}: {_x(v)} ({_x(cpu.get(p))})" for p, v in result["speedup"].items()) +
                 ". num_proc=None maps in the calling process, as run_mlm.py does without --preprocessing_num_workers; "
                 "1 and 2 start a worker pool. Ours drops blank lines before tokenizing, so it makes slightly fewer "
                 "blocks.")
    lines.append("")
    breakdown = result.get("breakdown")
    if breakdown:
        lines += [f"CPU seconds by step, on {breakdown['size_mb']:.0f} MB in one process (num_proc None):", ""]
        lines += [table(["step", "CPU s"], [(k, f"{v:.1%}" if k.startswith("share") else f"{v:.1f} MB" if k.endswith(": MB") else f"{v:.1f}")
                                            for k, v in breakdown["cpu_seconds"].items()]), ""]
        lines += ["cProfile of ours, by own time (the Rust tokenizer shows up as the `encode_batch` method):", "",
                  "```", breakdown["ours_top_functions"], "```", ""]
    return lines + _image(plots, "preprocess")


def write_glue(result, plots):
    lines = ["## 4. GLUE SST-2: default padding against padding to 128", ""]
    if (error := _error_block(result)) is not None:
        return lines + error
    if "skipped" in result:
        return lines + [f"Skipped: {result['skipped']}", ""]
    r = result["result"]
    variants = [k for k, v in r.items() if isinstance(v, dict)]
    lines += ["From `benchmarks/glue_padding.run` (MiniLM-L6 from ../shared, fine_tune_glue.py).", ""]
    lines += [table(["padding", "train s", "dev accuracy", "eval s"],
                    [(k, f"{r[k]['train_runtime']:.1f}", f"{r[k]['eval_accuracy']:.4f}", f"{r[k]['eval_runtime']:.1f}")
                     for k in variants]), ""]
    lines += [f"Training speed-up of the default: {_x(r.get('speedup'))}; accuracy difference (default - padded): "
              f"{r.get('accuracy_delta', float('nan')):+.4f}.", ""]
    return lines


def write_t5(result, plots):
    lines = ["## 5. T5: span-corruption collator and run_span_t5.py throughput", ""]
    if (error := _error_block(result)) is not None:
        return lines + error
    c = result["collator"]
    lines += [f"Collator (`benchmarks/t5_collator.run`, batch {c['batch']}, input length {c['input_length']}, "
              f"{c['row_format']} rows, median of {c['repeats']}): vectorized {c['vectorized_ms']:.2f} ms, per-row "
              f"{c['per_row_ms']:.2f} ms, speed-up {_x(c['speedup'])}.", ""]
    if "train" in result:
        t = result["train"]
        lines += [f"Training (`benchmarks/t5_train.py` in a fresh process, OpenMP threading as run_span_t5.py leaves it): {t['config']} on {t['device']}, batch {t['batch']}, input "
                  f"length {t['input_length']}, median step of the timed steps (after a warm-up step); the fp32 and bf16 "
                  "models take turns step by step, so the machine's busy moments hit both alike. MFU divides by "
                  "section 1's peak; 'MFU beside' by the matmul rate measured (0.5 s) right after each step, the "
                  "median over steps.", ""]
        lines += [table(["dtype", "timed steps", "step ms", "encoder tokens/s", "all tokens/s", "MFU", "MFU beside",
                         "collate ms", "collation share"],
                        [(r["dtype"], r.get("steps", t.get("steps")), f"{r['step_ms']:.0f}", _num(r["tokens_per_second"]),
                          _num(r["all_tokens_per_second"]), _pct(r["mfu"]) if r["mfu"] is not None else "n/a",
                          _pct(r.get("mfu_beside")), f"{r['collator_ms']:.2f}", _pct(r["collator_share"], 2))
                         for r in t["rows"]]), ""]
        if all(r.get("all_step_ms") for r in t["rows"]):
            lines += ["Every timed step, ms: " + "; ".join(
                f"{r['dtype']} {', '.join(f'{ms:,.0f}' for ms in r['all_step_ms'])}" for r in t["rows"]) + ".", ""]
        if all(r.get("peak_beside_gflops") for r in t["rows"]):
            lines += ["Matmul rate right after each step, GFLOP/s: " + "; ".join(
                f"{r['dtype']} {', '.join(f'{g:.1f}' for g in r['peak_beside_gflops'])}" for r in t["rows"]) + ".", ""]
    else:
        lines += [f"Training skipped: {result.get('train_skipped')}", ""]
    return lines


def write_sweep(result, plots):
    lines = ["## 6. Sweep overhead: seconds from a trial's launch to its first training step", ""]
    if (error := _error_block(result)) is not None:
        return lines + error
    lines += [f"`python sweep.py SWEEP.yaml --count {len(result['trials'])}` on a generated grid sweep: "
              f"{result['setup']}. Read from each trial's metrics.jsonl (`train/seconds_to_first_step`). Load "
              f"{result['load_before']:.1f} before, {result['load_after']:.1f} after.", ""]
    lines += [table(["trial", "seconds to first step", "eval loss"],
                    [(t["trial"], _s(t["seconds_to_first_step"]), _num(t.get("eval_loss"), 3)) for t in result["trials"]]), ""]
    cpu = result.get("import_cpu_seconds")
    lines += [f"`import run_mlm` alone (fresh interpreter): {result['import_seconds']:.1f} s"
              + (f" ({cpu:.1f} s of CPU time)" if cpu else "") + ", the floor for every trial that no cache removes "
              f"(torch, transformers' Trainer, datasets, evaluate). The agent took {result['agent_seconds']:.0f} s "
              "for all trials.", ""]
    return lines + _image(plots, "sweep")


SECTION_WRITERS = {"peak": write_peak, "mlm": write_mlm, "profile": write_profile, "experiments": write_experiments,
                   "preprocess": write_preprocess, "glue": write_glue, "t5": write_t5, "sweep": write_sweep}


def read_previous(path, with_meta=False):
    """The raw results (and run metadata) embedded in an earlier RESULTS.md, or {}."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        block = text[text.index(RAW_BEGIN) + len(RAW_BEGIN):text.index(RAW_END)]
        raw = json.loads(block.strip().removeprefix("```json").removesuffix("```"))
        return (raw["results"], raw["meta"]) if with_meta else raw["results"]
    except (OSError, ValueError, KeyError):
        return ({}, {}) if with_meta else {}


def write_results(results, meta, out_dir):
    try:
        plots = make_plots(results, out_dir)
    except Exception:  # a plot must never cost the figures
        traceback.print_exc()
        plots = {}
    path = os.path.join(out_dir, "RESULTS.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(render(results, meta, plots))
    os.replace(path + ".tmp", path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes: checks the harness works")
    parser.add_argument("--out", help="folder for RESULTS.md and the PNGs (default: benchmarks/, or "
                                      "outputs/benchmarks-quick/ with --quick)")
    parser.add_argument("--only", help=f"comma-separated sections to run: {','.join(SECTIONS)}")
    parser.add_argument("--skip", help="comma-separated sections to leave out")
    parser.add_argument("--render", action="store_true", help="only rewrite RESULTS.md and the plots from its raw JSON")
    args = parser.parse_args(argv)
    out_dir = args.out or (os.path.join(REPO_ROOT, "outputs", "benchmarks-quick") if args.quick else HERE)
    os.makedirs(out_dir, exist_ok=True)
    if args.render:
        results, meta = read_previous(os.path.join(out_dir, "RESULTS.md"), with_meta=True)
        if not results:
            parser.error(f"no raw results in {os.path.join(out_dir, 'RESULTS.md')}")
        print(f"wrote {write_results(results, meta, out_dir)}")
        return results
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    skipped = {s.strip() for s in args.skip.split(",")} if args.skip else set()
    unknown = (set(chosen) | skipped) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    results, previous_meta = read_previous(os.path.join(out_dir, "RESULTS.md"), with_meta=True) if args.only else ({}, {})
    started = time.time()
    meta = {"quick": args.quick, "machine": machine_info(), "load_start": os.getloadavg(), "sections_run": [],
            "section_seconds": dict(previous_meta.get("section_seconds", {}))}
    for section in RUN_ORDER:
        if section not in chosen or section in skipped or (args.quick and not args.only and section in NOT_IN_QUICK):
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {section} (load {os.getloadavg()[0]:.1f})", flush=True)
        begin = time.time()
        try:
            result = RUNNERS[section](args.quick, results)
        except Exception:
            result = {"error": traceback.format_exc()}
            print(result["error"], file=sys.stderr, flush=True)
        results[section] = result
        meta["sections_run"].append(section)
        meta["section_seconds"][section] = round(time.time() - begin, 1)
        meta.update(load_end=os.getloadavg(), finished=time.strftime("%Y-%m-%d %H:%M"),
                    minutes=(time.time() - started) / 60)
        path = write_results(results, meta, out_dir)  # after every section: a later failure keeps these
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
