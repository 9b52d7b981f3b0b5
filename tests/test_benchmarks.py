"""The benchmark harness works: cheap pieces at tiny sizes, structure only (timings are never judged)."""

import json
import math
import os
import sys

import pytest
import torch

from conftest import ROOT, TINY_BERT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import mlm_throughput  # noqa: E402
import preprocess  # noqa: E402
import run as bench  # noqa: E402
import t5_collator  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["NN", "NT", "TN"])
def test_matmul_rate_is_positive(dtype, layout):
    rate, one = bench.matmul_rate(dtype, 64, layout, seconds=0.01)
    assert rate > 0 and one > 0


def test_bf16_peak_is_timed_the_way_the_scripts_multiply(monkeypatch):
    """On a CPU without bf16 matrix units the scripts multiply bf16 operands in fp32, so the bf16 peak that the
    live train/mfu divides by times that product; elsewhere torch's bf16 GEMM."""
    import train_utils

    seen = []
    matmul = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b, **kw: seen.append(a.dtype) or matmul(a, b, **kw))
    for native, expected in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(train_utils, "native_bf16_matmul", lambda device="cpu", native=native: native)
        seen.clear()
        assert train_utils.measure_peak_flops(torch.bfloat16, size=32, seconds=0.01) > 0
        assert set(seen) == {expected}
    rate, _ = bench.matmul_rate(torch.bfloat16, 64, "NT", seconds=0.01, through_fp32=True)
    assert rate > 0


def test_step_throughput_reads_per_step_logs():
    history = [{"loss": 9.0, "step": s, "num_input_tokens_seen": 100 * s, "tokens_per_second": 50.0 * s, "mfu": 0.1}
               for s in range(1, 5)] + [{"train_runtime": 1.0, "step": 4}]
    result = mlm_throughput.step_throughput(history, warmup_steps=1)
    assert result["measured_steps"] == 3
    # steps 2-4: 300 tokens in 100/100 + 100/150 + 100/200 seconds
    assert result["tokens_per_second"] == pytest.approx(300 / (1 + 2 / 3 + 0.5))
    assert result["best_step_tokens_per_second"] == 200.0 and result["logged_mfu"] == pytest.approx(0.1)


def test_seconds_to_first_step_and_throughput_reach_logs(tmp_path, text_corpus, monkeypatch):
    import run_mlm

    metrics_file = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("SWEEP_METRICS_FILE", str(metrics_file))
    run_mlm.main([*TINY_BERT, f"--output_dir={tmp_path / 'out'}", "--max_steps=2", "--save_strategy=no", "--do_train",
                  f"--train_file={text_corpus / 'train.txt'}"])
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    firsts = [r["train/seconds_to_first_step"] for r in records if "train/seconds_to_first_step" in r]
    assert len(firsts) == 1 and firsts[0] > 0  # logged once
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    per_step = [h for h in history if "loss" in h]
    assert per_step and all(h["tokens_per_second"] > 0 for h in per_step)  # also in the saved log history
    assert "seconds_to_first_step" in per_step[0]


def test_run_writes_results_and_plots(tmp_path, monkeypatch):
    """run.py end to end on the cheap sections, shrunk: RESULTS.md, its raw JSON and the PNGs."""
    monkeypatch.setitem(bench.RUNNERS, "peak", lambda quick, results: bench.section_peak(
        quick, sizes=(64, 128), window=0.01, project_size=128))
    # num_proc None maps in this process: a worker pool costs seconds to start.
    monkeypatch.setitem(bench.RUNNERS, "preprocess", lambda quick, results: preprocess.run(
        quick, size_mb=0.3, num_procs=(None,), work_dir=str(tmp_path)))
    monkeypatch.setitem(bench.RUNNERS, "t5", lambda quick, results: {"collator": t5_collator.run(
        batch=4, input_length=64, repeats=2)})
    out = tmp_path / "results"
    results = bench.main(["--quick", "--out", str(out), "--only", "peak,preprocess,t5"])

    text = (out / "RESULTS.md").read_text()
    assert "## Machine" in text and "## Targets" in text and "QUICK MODE" in text
    assert bench.cpu_model() in text and torch.__version__ in text
    for section in ("peak", "preprocess", "t5"):
        assert "error" not in results[section], results[section].get("error")
    peak = results["peak"]["peak_flops"]
    assert peak["fp32"] > 0 and peak["bf16"] > 0
    rows = {r["pipeline"]: r for r in results["preprocess"]["rows"]}
    assert all(r["seconds"] > 0 for r in rows.values())
    assert rows["ours"]["columns"] == ["input_ids"]
    assert {"input_ids", "attention_mask", "special_tokens_mask"} <= set(rows["hf"]["columns"])
    # Ours skips blank lines (each would add [CLS] [SEP]): never more blocks than the HF approach.
    assert 0 < rows["ours"]["blocks"] <= rows["hf"]["blocks"]
    assert math.isfinite(results["preprocess"]["speedup"][None])
    assert results["t5"]["collator"]["speedup"] > 0
    assert (out / "peak.png").stat().st_size > 0 and (out / "preprocess.png").stat().st_size > 0

    # --only reads the other sections back from RESULTS.md
    previous = bench.read_previous(str(out / "RESULTS.md"))
    assert previous["preprocess"]["rows"] == json.loads(json.dumps(results["preprocess"]["rows"]))


@pytest.mark.slow
def test_quick_run_of_every_section_as_ci_runs_it(tmp_path):
    """`python benchmarks/run.py --quick` as a user types it (about 2 minutes here): every section it runs gives
    figures, not an error, and RESULTS.md carries them with the MFU measured beside the runs."""
    import subprocess

    out = tmp_path / "quick"
    env = dict(os.environ, HF_SCRIPTS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--out", str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = bench.read_previous(str(out / "RESULTS.md"))
    ran = [s for s in bench.SECTIONS if s not in bench.NOT_IN_QUICK]
    assert sorted(results) == sorted(ran)
    for section in ran:
        assert "error" not in results[section], results[section]["error"]
    for row in results["mlm"]["rows"]:
        assert row["tokens_per_second"] > 0 and row["mfu_beside"] > 0 and len(row["all_peak_beside_gflops"]) == 1
    assert all(row["tokens_per_second"] > 0 for row in results["t5"]["train"]["rows"])
    assert results["sweep"]["later_trials_max_seconds"] > 0


def test_cached_peak_only_goes_up(monkeypatch):
    """A peak measured while the machine was busy reads low; the cache keeps the best rate seen, so the live
    train/mfu is never divided by a stale low figure (it once read 149%)."""
    import train_utils

    rates = iter([5e10, 2e10, 9e10])
    monkeypatch.setattr(train_utils, "measure_peak_flops", lambda dtype, **kwargs: next(rates))
    assert train_utils.cached_peak_flops(torch.float64) == 5e10  # first measurement remembered
    assert train_utils.cached_peak_flops(torch.float64) == 5e10  # a busier moment does not lower it
    assert train_utils.cached_peak_flops(torch.float64) == 9e10  # a quieter one raises it


def test_t5_mfu_beside_divides_each_step_by_the_rate_measured_after_it(monkeypatch):
    """On a shared machine a step in a busy stretch reads low against the run's quietest moment, so the T5
    benchmark also divides each timed step by the matmul rate measured right after it (never after warm-up)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import t5_train
    import train_utils

    measured = []

    def rate(dtype, **kwargs):
        measured.append(dtype)
        return 5e9

    monkeypatch.setattr(train_utils, "measure_peak_flops", rate)
    rows = t5_train.time_training("t5-tiny", 2, 128, 3, (torch.float32, torch.bfloat16), "cpu",
                                  peaks={"fp32": 1e10, "bf16": 2e10})
    assert measured == [torch.float32, torch.bfloat16] * 3  # one per timed step, in turns
    fp32, bf16 = rows
    assert fp32["peak_beside_gflops"] == bf16["peak_beside_gflops"] == [5.0] * 3
    # Odd step count: the median of per-step ratios is the ratio at the median step.
    assert fp32["mfu_beside"] == pytest.approx(2 * fp32["mfu"], rel=1e-9)
    assert bf16["mfu_beside"] == pytest.approx(4 * bf16["mfu"], rel=1e-9)


@pytest.mark.parametrize("row, shown, verdict", [
    ({"mfu": 0.45, "mfu_beside": 0.55}, "55.0% beside (against the run's peak: 45.0%)", "MET"),
    ({"mfu": 0.55, "mfu_beside": 0.45}, "45.0% beside (against the run's peak: 55.0%)", "MISSED"),
    ({"mfu": 0.55}, "55.0%", "MET"),
    (None, "n/a", "not measured"),
])
def test_mfu_targets_show_both_peaks_and_judge_beside(row, shown, verdict):
    assert bench._mfu_target(row) == (shown, verdict)
