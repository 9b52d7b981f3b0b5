"""tokens/s and MFU: the peak comes from a table (GPUs), a measurement made once per machine (CPUs) or the flag."""

import json
from types import SimpleNamespace

import pytest
import torch

import throughput
from conftest import TINY_BERT


def args(bf16=False, fp16=False, tf32=None, use_cpu=False):
    return SimpleNamespace(bf16=bf16, fp16=fp16, tf32=tf32, use_cpu=use_cpu)


@pytest.mark.parametrize("name, training_args, tflops", [
    ("NVIDIA H100 80GB HBM3", args(bf16=True), 989),
    ("NVIDIA H100 PCIe", args(bf16=True), 756),
    ("NVIDIA H200", args(fp16=True), 989),
    ("NVIDIA A100-SXM4-80GB", args(tf32=True), 156),
    ("NVIDIA A100-SXM4-80GB", args(), 19.5),
    ("NVIDIA L40S", args(bf16=True), 362),  # not the L4's 121
    ("NVIDIA L4", args(bf16=True), 121),
    ("NVIDIA GeForce GTX 1080", args(bf16=True), None),
])
def test_gpu_peak_is_the_published_figure_for_the_dtype_without_timing_anything(monkeypatch, name, training_args, tflops):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(throughput, "cpu_peak_flops", lambda *a, **k: pytest.fail("timed a matmul on a GPU machine"))
    peak = throughput.peak_flops(training_args)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))
    assert throughput.peak_flops(training_args, peak_tflops=100) == 1e14  # --peak_tflops wins


def test_cpu_peak_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SCRIPTS_CACHE", str(tmp_path))
    first = throughput.cpu_peak_flops(torch.float32, size=64, seconds=0.01)
    assert first > 0
    cache = tmp_path / "peak_flops.json"
    known = json.loads(cache.read_text())
    assert list(known.values()) == [first]
    cache.write_text(json.dumps({key: 123.0 for key in known}))
    assert throughput.cpu_peak_flops(torch.float32, size=64, seconds=0.01) == 123.0  # read, not measured again
    assert throughput.peak_flops(args(use_cpu=True)) == 123.0
    assert throughput.peak_flops(args(use_cpu=True), peak_tflops=0.5) == 5e11


def test_seconds_to_first_step_and_throughput_reach_logs(tmp_path, text_corpus, monkeypatch):
    import run_mlm

    metrics_file = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("SWEEP_METRICS_FILE", str(metrics_file))
    run_mlm.main([*TINY_BERT, f"--output_dir={tmp_path / 'out'}", "--max_steps=2", "--save_strategy=no", "--do_train",
                  f"--train_file={text_corpus / 'train.txt'}", "--peak_tflops=0.001"])
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    firsts = [r["train/seconds_to_first_step"] for r in records if "train/seconds_to_first_step" in r]
    assert len(firsts) == 1 and firsts[0] > 0  # logged once
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    per_step = [h for h in history if "loss" in h]
    assert per_step and all(h["tokens_per_second"] > 0 for h in per_step)  # also in the saved log history
    assert "seconds_to_first_step" in per_step[0]
    # MFU divides by --peak_tflops: 1 GFLOP/s
    flops = per_step[-1]["mfu"] * 1e9 / per_step[-1]["tokens_per_second"]
    assert 1e4 < flops < 1e7  # a tiny BERT's training FLOPs per token


def test_an_mfu_above_1_warns_once_with_the_fix(caplog):
    import logging
    import time

    caplog.set_level(logging.WARNING)
    callback = throughput.ThroughputCallback(flops_per_token=1e9, peak_flops=1e6)  # a peak far too low
    for step in (1, 2):
        callback._last = (time.perf_counter() - 1.0, 0)
        state = SimpleNamespace(num_input_tokens_seen=1000, log_history=[], global_step=step, is_world_process_zero=True)
        logs = {"loss": 1.0}
        callback.on_log(SimpleNamespace(world_size=1), state, None, logs=logs)
        assert logs["mfu"] > 1
    warnings = [r.getMessage() for r in caplog.records if "train/mfu" in r.getMessage()]
    assert len(warnings) == 1 and "--peak_tflops" in warnings[0] and "peak_flops.json" in warnings[0]
