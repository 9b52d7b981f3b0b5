"""Benchmark: training throughput of run_span_t5.py's small T5 (configs/t5-small.json, T5 v1.1 small, 77M
parameters) and the span-corruption collator's share of a training step.

    python benchmarks/t5_train.py                       # n=512, batch 32 on a GPU; batch 8 on a CPU
    python benchmarks/t5_train.py --batch 8 --steps 5 --config t5-tiny
    python benchmarks/t5_train.py --quick               # t5-tiny, n=128, batch 2: a smoke test

One training step is what run_span_t5.py's Trainer does per batch: collate (span corruption of packed rows),
forward and backward, AdamWScale update. The collator is timed on its own and reported as its share of
collate + step: the time an accelerator would wait if the training process collated (run_span_t5.py gives
the job to DataLoader workers on a GPU, where they work while the GPU computes).
Tokens per second count encoder input tokens (as the Trainer's train/tokens_per_second does) and, for
reference, encoder plus decoder tokens. Other code can call `run(...)`.
"""

import argparse
import json
import os
import statistics
import sys
import time

if "OMP_WAIT_POLICY" not in os.environ:  # as run_span_t5.py sets it, before torch loads
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.join(REPO_ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import t5_collator  # noqa: E402
import train_utils  # noqa: E402
from data_utils import DataCollatorForT5SpanCorruption  # noqa: E402
from run_span_t5 import AdamWScale, untie_output_layer  # noqa: E402
from transformers import AutoConfig, AutoModelForSeq2SeqLM  # noqa: E402


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(config_name, batch, input_length, dtype, device, seed=0):
    """(step, flops per token, target length) for one dtype: `step()` collates one batch and runs one training
    step on it, and returns (collate seconds, step seconds)."""
    if device == "cpu":
        train_utils.keep_freed_memory_for_reuse()  # as run_span_t5.py does before training on a CPU
    torch.manual_seed(seed)
    tokenizer = t5_collator.make_tokenizer()  # sentinels and </s> only: enough to collate
    config = AutoConfig.from_pretrained(os.path.join(REPO_ROOT, "configs", f"{config_name}.json"))
    config.vocab_size = 32128  # T5's vocabulary, rounded up as run_span_t5.py does: the output layer's real cost
    model = AutoModelForSeq2SeqLM.from_config(config)
    untie_output_layer(model)  # as run_span_t5.py does for a v1.1 config from scratch
    model.to(device).train()
    if train_utils.bf16_goes_through_fp32(dtype, device):
        train_utils.bf16_through_fp32(model)  # as the scripts do on a CPU without bf16 matrix units
    optimizer = AdamWScale(model.parameters(), lr=1e-3)
    collator = DataCollatorForT5SpanCorruption(tokenizer, input_length=input_length, seed=seed)
    # Rows as the script hands them over: numpy arrays from a dataset in numpy format.
    rows = np.random.default_rng(seed).integers(3, 32000, size=(batch, collator.raw_length), dtype=np.int64)
    examples = [{"input_ids": row} for row in rows]

    def step():
        start = time.perf_counter()
        inputs = collator(examples)
        collated = time.perf_counter()
        inputs = {key: value.to(device, non_blocking=True) for key, value in inputs.items()}
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return collated - start, time.perf_counter() - collated

    flops = train_utils.encoder_decoder_flops_per_token(model, input_length, collator.target_length)
    return step, flops, collator.target_length


def time_training(config_name, batch, input_length, steps, dtypes, device, seed=0, mfu=True, peaks=None):
    """Median ms of a training step (collator excluded) and of collating one batch, per dtype. The dtypes take
    turns step by step, so a busy moment of a shared machine hits each of them alike.

    MFU twice: against `peaks` ({"fp32": FLOP/s, "bf16": ...}; by default the best matmul rate seen here,
    train_utils.cached_peak_flops), and against the matmul rate measured right after each timed step (0.5 s,
    the same product as the peak), the median over steps. On a shared machine the first compares a step with
    the quietest moment of the whole run; the second with the moment the step ran in."""
    setups = {dtype: make_step(config_name, batch, input_length, dtype, device, seed) for dtype in dtypes}
    times = {dtype: ([], [], []) for dtype in dtypes}  # collate s, step s, FLOP/s of a matmul right after
    warmup = 2 if device == "cuda" else 1  # allocator, kernel selection (and cuBLAS autotuning)
    for i in range(steps + warmup):
        for dtype, (step, _, _) in setups.items():
            collate_seconds, step_seconds = step()
            if i >= warmup:
                times[dtype][0].append(collate_seconds)
                times[dtype][1].append(step_seconds)
                if mfu:
                    times[dtype][2].append(train_utils.measure_peak_flops(dtype, seconds=0.5, device=device))
    rows = []
    for dtype, (_, flops, target_length) in setups.items():
        peak = (peaks or {}).get("fp32" if dtype == torch.float32 else "bf16")
        if mfu and peak is None:
            peak = train_utils.cached_peak_flops(dtype, device)
        elif not mfu:
            peak = None
        collates, step_times, beside = times[dtype]
        step_ms, collate_ms = statistics.median(step_times) * 1000, statistics.median(collates) * 1000
        tokens = batch * input_length
        rows.append({
            "dtype": str(dtype).replace("torch.", ""),
            "steps": steps,
            "step_ms": step_ms,
            "all_step_ms": [round(s * 1000, 1) for s in step_times],
            "tokens_per_second": tokens / step_ms * 1000,
            "all_tokens_per_second": batch * (input_length + target_length) / step_ms * 1000,
            "mfu": tokens / step_ms * 1000 * flops / peak if peak else None,
            "peak_flops": peak,
            "peak_beside_gflops": [round(rate / 1e9, 1) for rate in beside],
            "mfu_beside": statistics.median(tokens * flops / (s * rate) for s, rate in zip(step_times, beside))
            if beside else None,
            "collator_ms": collate_ms,
            "collator_share": collate_ms / (step_ms + collate_ms),
            "target_length": target_length,
        })
    return rows


def run(quick=False, config="t5-small", batch=None, input_length=512, steps=None, device=None, peaks=None):
    """Time fp32 and bf16 training steps, in turns; returns a dict with one row per dtype and the collator
    benchmark. `peaks`: {"fp32": FLOP/s, "bf16": FLOP/s} to compute MFU against (benchmarks/run.py passes its
    section 1)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if quick:
        config, input_length, batch, steps = "t5-tiny", 128, batch or 2, steps or 1
    # 32 x 512 is the batch the collator target refers to (the script's recipe trains at 128). On 2 CPU cores a
    # step of the 77M model at batch 32 takes 15-25 s, so CPUs get batch 8 and 8 timed steps per dtype. Smaller
    # batches measure the per-step fixed costs more than the model: at batch 2 the update of 77M weights
    # (AdamWScale), autocast's weight casts and the embedding gradient took ~20% of a bf16 step (torch.profiler),
    # and bf16 MFU read ~45% against ~52% at batch 8. The collator's share barely depends on the batch, as
    # collating and the step both grow in proportion to it.
    batch = batch or (32 if device == "cuda" else 8)
    rows = time_training(config, batch, input_length, steps or (10 if device == "cuda" else 8),
                         (torch.float32, torch.bfloat16), device, mfu=not quick, peaks=peaks)
    reference = t5_collator.run(batch=32, input_length=512, repeats=20 if quick else 100)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "config": config, "batch": batch, "input_length": input_length, "rows": rows,
        "collator_vs_per_row": {k: reference[k] for k in ("vectorized_ms", "per_row_ms", "speedup")},
    }


def print_table(result):
    print(f"{result['config']} on {result['device']}: batch {result['batch']}, n={result['input_length']} "
          f"(targets {result['rows'][0]['target_length']}), median step")
    print(f"{'dtype':<9}{'steps':>6}{'step ms':>10}{'enc tok/s':>12}{'all tok/s':>12}{'MFU':>8}{'beside':>8}"
          f"{'collate ms':>12}{'share':>8}")
    for row in result["rows"]:
        mfu, beside = ("n/a" if row[key] is None else f"{row[key]:.1%}" for key in ("mfu", "mfu_beside"))
        print(f"{row['dtype']:<9}{row['steps']:>6}{row['step_ms']:>10.1f}{row['tokens_per_second']:>12.0f}{row['all_tokens_per_second']:>12.0f}"
              f"{mfu:>8}{beside:>8}{row['collator_ms']:>12.2f}{row['collator_share']:>8.2%}")
    print("MFU: against the run's peak; beside: against a matmul timed right after each step (median over steps)")
    ref = result["collator_vs_per_row"]
    print(f"collator, batch 32, n=512: vectorized {ref['vectorized_ms']:.2f} ms, per-row {ref['per_row_ms']:.2f} ms, "
          f"speed-up {ref['speedup']:.1f}x (benchmarks/t5_collator.py)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="t5-small", help="a preset under configs/ (without .json)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--input-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peaks", help='JSON {"fp32": FLOP/s, "bf16": FLOP/s} to compute MFU against')
    parser.add_argument("--json", action="store_true", help="print the result as JSON (for benchmarks/run.py)")
    args = parser.parse_args()
    result = run(args.quick, args.config, args.batch, args.input_length, args.steps,
                 peaks=json.loads(args.peaks) if args.peaks else None)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
