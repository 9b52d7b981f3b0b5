"""The benchmark harness works: cheap pieces at tiny sizes, structure only (timings are never judged)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import mlm_throughput  # noqa: E402
import preprocess  # noqa: E402
import run as bench  # noqa: E402
import t5_collator  # noqa: E402


def test_step_throughput_reads_per_step_logs():
    history = [{"loss": 9.0, "step": s, "num_input_tokens_seen": 100 * s, "tokens_per_second": 50.0 * s, "mfu": 0.1 * s}
               for s in range(1, 5)] + [{"train_runtime": 1.0, "step": 4}]
    result = mlm_throughput.step_throughput(history, warmup_steps=1)
    # steps 2-4: 300 tokens in 100/100 + 100/150 + 100/200 seconds
    assert result["tokens_per_second"] == pytest.approx(300 / (1 + 2 / 3 + 0.5))
    assert result["mfu"] == pytest.approx(0.3)


def test_preprocess_pipelines_make_the_same_blocks_from_the_same_text(tmp_path):
    """Ours keeps only input_ids and drops blank lines (each would add [CLS] [SEP]); otherwise the same blocks."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(mlm_throughput.bench_tokenizer(str(tmp_path))[0])
    corpus = tmp_path / "corpus.txt"
    size_mb, _ = preprocess.write_distinct_corpus(str(corpus), str(tmp_path / "embedded"), max_mb=0.05)
    lines = corpus.read_text().splitlines()
    assert 0.04 < size_mb < 0.06 and len(set(lines)) > 0.9 * len([line for line in lines if line.strip()])
    raw = preprocess.data_utils.load_data_file(str(corpus), "--train_file", cache_dir=str(tmp_path / "hf"))
    ours = preprocess.ours(raw, tokenizer, None, str(tmp_path / "ours"))
    theirs = preprocess.hf_approach(raw, tokenizer, None)
    assert ours.column_names == ["input_ids"] and "special_tokens_mask" in theirs.column_names
    assert 0 < len(ours) <= len(theirs)
    without_blank_lines = preprocess.hf_approach(raw.filter(lambda e: e["text"].strip() != ""), tokenizer, None)
    assert ours["input_ids"] == without_blank_lines["input_ids"]


def test_t5_collator_benchmark_compares_equal_shapes():
    result = t5_collator.run(batch=4, input_length=64, repeats=2)
    assert result["vectorized_ms"] > 0 and result["per_row_ms"] > 0 and result["target_length"] > 0


def fake_results():
    mlm_row = {"tokens_per_second": 1000.0, "all_tokens_per_second": [990.0, 1000.0, 1010.0], "mfu": 0.5,
               "perplexity": 900.0, "peak_memory_mb": 1000.0}
    return {
        "mlm": {"settings": {"batch": 32, "steps": 20, "rounds": 3, "seq_len": 128, "eval_samples": 512, "model": "m",
                             "tokenizer": "t", "corpus": "c"},
                "rows": {"ours (sparse head)": dict(mlm_row, tokens_per_second=2500.0), "HF (dense head)": mlm_row},
                "speedup": 2.5, "perplexity_gap": 0.03},
        "preprocess": {"corpus_mb": 4.0, "corpus": "c", "tokenizer": "t", "block_size": 128, "rounds": 3,
                       "rows": [{"pipeline": p, "num_proc": None, "seconds": 1.0, "cpu_seconds": 1.0, "mb_per_second": 4.0,
                                 "blocks": 10, "columns": ["input_ids"], "all_seconds": [1.0]} for p in ("ours", "hf")],
                       "speedup": {"None": 3.0, "2": 1.5}},
        "t5": {"rows": [{"row_format": "numpy", "batch": 32, "input_length": 512, "target_length": 114,
                         "vectorized_ms": 1.0, "per_row_ms": 5.0, "speedup": 5.0}], "speedup": 5.0},
        "sweep": {"trials": [{"trial": 0, "seconds_to_first_step": 20.0, "eval_loss": 8.0}], "setup": "s",
                  "import_seconds": 5.0, "import_cpu_seconds": 4.0, "later_trials_max_seconds": 9.0},
        "glue": {"default (per batch)": {"train_runtime": 10.0, "eval_accuracy": 0.85, "eval_runtime": 1.0,
                                         "train_samples": 8000, "eval_samples": 872},
                 "pad to 128 (run_glue)": {"train_runtime": 50.0, "eval_accuracy": 0.851, "eval_runtime": 3.0,
                                           "train_samples": 8000, "eval_samples": 872},
                 "speedup": 5.0, "accuracy_delta": -0.001, "accuracy_gap": 0.001},
    }


def test_targets_are_judged_and_the_report_is_short_tables():
    results = fake_results()
    verdicts = {row["key"]: row["verdict"] for row in bench.judge(results, quick=False)}
    assert verdicts["mlm.speedup"] == "MET" and verdicts["mlm.perplexity_gap"] == "MISSED"
    assert verdicts["preprocess.speedup.None"] == "MET" and verdicts["preprocess.speedup.2"] == "MISSED"
    assert verdicts["sweep.later_trials_max_seconds"] == "MET" and verdicts["glue.accuracy_gap"] == "MET"
    assert set(row["verdict"] for row in bench.judge(results, quick=True)) == {"(quick: not judged)"}
    machine = {"cpu": "cpu", "cores": 2, "torch_threads": 2, "bf16_matrix_units": False, "python": "3", "torch": "t",
               "transformers": "t", "datasets": "d", "gpu": None}
    data = {"meta": {"quick": False, "machine": machine, "load_start": 1.0, "load_end": 1.0, "finished": "now",
                     "minutes": 20.0}, "results": results, "targets": bench.judge(results, quick=False)}
    text = bench.render(data)
    assert len(text.splitlines()) <= 250 and "```" not in text  # tables and findings, no data block
    assert "| MLM: perplexity gap, sparse vs dense head | <= 2.00% | 3.00% | MISSED |" in text
    assert "Sparse head / dense head tokens/s: 2.50x" in text and "5.00x" in text


@pytest.mark.slow
def test_quick_run_as_ci_runs_it(tmp_path):
    """`python benchmarks/run.py --quick` as a user types it (about 2-3 minutes here): every section it runs gives
    figures, not an error, and results.json and RESULTS.md are written."""
    out = tmp_path / "quick"
    env = dict(os.environ, HF_SCRIPTS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--out", str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    ran = [s for s in bench.SECTIONS if s not in bench.NOT_IN_QUICK]
    assert sorted(data["results"]) == sorted(ran)
    for section in ran:
        assert "error" not in data["results"][section], data["results"][section]["error"]
    for row in data["results"]["mlm"]["rows"].values():
        assert row["tokens_per_second"] > 0 and 0 < row["mfu"] < 1
    assert data["results"]["sweep"]["later_trials_max_seconds"] > 0
    assert "## Targets" in (out / "RESULTS.md").read_text()


def test_the_gpu_check_script_parses():
    """benchmarks/gpu.sh runs only where a GPU is lent; here its syntax is checked (its CPU dry run, in its header,
    takes minutes)."""
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu.sh")], check=True)
