"""Benchmark: batched T5 span corruption (span_corruption.DataCollatorForT5SpanCorruption) against the same
algorithm written one row at a time.

    python benchmarks/t5_collator.py [--batch 32] [--input-length 512] [--repeats 200] [--row-format all]

Both sides get the same rows and return the same tensors. `--row-format` picks what the rows hold:
numpy arrays (a dataset read with `.with_format("numpy")`) or Python lists (a dataset's default format,
where turning the lists into arrays costs the same on both sides). Other code can call `run(...)`.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

# Importable by file path from anywhere (no package needed): span_corruption lives in the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from span_corruption import DataCollatorForT5SpanCorruption  # noqa: E402

ROW_FORMATS = ("numpy", "list")


def per_row_span_corruption(
    examples, rng, sentinel_ids, eos_token_id, decoder_start_token_id, noise_density=0.15, mean_noise_span_length=3.0
):
    """Reference: T5 span corruption the straightforward way, one numpy row at a time.

    Same algorithm and outputs as DataCollatorForT5SpanCorruption (noise count, span count, uniformly
    random span lengths, kept/noise alternation, sentinels, EOS, shifted decoder inputs).
    """

    def random_split(total, parts):
        # Shuffle parts - 1 cut flags among the total - 1 gaps between tokens.
        cut_flags = np.zeros(total - 1, dtype=bool)
        cut_flags[: parts - 1] = True
        cut_flags = rng.permutation(cut_flags)
        return np.diff(np.concatenate([[0], np.flatnonzero(cut_flags) + 1, [total]]))

    all_inputs, all_labels = [], []
    for example in examples:
        tokens = np.asarray(example["input_ids"], dtype=np.int64)
        length = len(tokens)
        num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
        num_spans = min(max(1, int(round(num_noise / mean_noise_span_length))), length - num_noise)

        kept_lengths = random_split(length - num_noise, num_spans)
        noise_lengths = random_split(num_noise, num_spans)
        span_lengths = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
        segment = np.repeat(np.arange(2 * num_spans), span_lengths)
        is_noise = segment % 2 == 1
        is_span_start = np.zeros(length, dtype=bool)
        is_span_start[0] = True
        is_span_start[np.cumsum(span_lengths)[:-1]] = True
        sentinels = sentinel_ids[segment // 2]

        starts_noise = is_span_start & is_noise
        starts_kept = is_span_start & ~is_noise
        inputs = np.where(starts_noise, sentinels, tokens)[~is_noise | starts_noise]
        labels = np.where(starts_kept, sentinels, tokens)[is_noise | starts_kept]
        all_inputs.append(np.append(inputs, eos_token_id))
        all_labels.append(np.append(labels, eos_token_id))

    input_ids = np.stack(all_inputs)
    labels = np.stack(all_labels)
    decoder_input_ids = np.concatenate([np.full((len(labels), 1), decoder_start_token_id), labels[:, :-1]], axis=1)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "decoder_input_ids": torch.from_numpy(decoder_input_ids),
    }


def make_tokenizer():
    """A T5 tokenizer built in memory (4 pieces + 100 sentinels): enough for collating, nothing downloaded."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast()


def _median_ms(function, repeats):
    for _ in range(5):  # warm-up: allocator, lazy imports
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def run(batch=32, input_length=512, repeats=200, row_format="numpy", tokenizer=None, seed=0):
    """Time both implementations on the same `batch` rows; returns median ms per batch and the speed-up."""
    if row_format not in ROW_FORMATS:
        raise ValueError(f"row_format must be one of {ROW_FORMATS}, got {row_format!r}")
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    collator = DataCollatorForT5SpanCorruption(tokenizer, input_length=input_length, seed=seed)

    data_rng = np.random.default_rng(seed)
    rows = data_rng.integers(5, 32000, size=(batch, collator.raw_length), dtype=np.int64)
    examples = [{"input_ids": row if row_format == "numpy" else row.tolist()} for row in rows]

    reference_rng = np.random.default_rng(seed)

    def reference():
        return per_row_span_corruption(
            examples,
            reference_rng,
            collator.sentinel_ids,
            collator.eos_token_id,
            collator.decoder_start_token_id,
            collator.noise_density,
            collator.mean_noise_span_length,
        )

    vectorized_out, reference_out = collator(examples), reference()
    for key, tensor in vectorized_out.items():
        if tensor.shape != reference_out[key].shape:
            raise AssertionError(f"{key}: {tuple(tensor.shape)} vs reference {tuple(reference_out[key].shape)}")

    vectorized_ms = _median_ms(lambda: collator(examples), repeats)
    per_row_ms = _median_ms(reference, repeats)
    return {
        "batch": batch,
        "input_length": input_length,
        "raw_length": collator.raw_length,
        "target_length": collator.target_length,
        "row_format": row_format,
        "repeats": repeats,
        "vectorized_ms": vectorized_ms,
        "per_row_ms": per_row_ms,
        "speedup": per_row_ms / vectorized_ms,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--row-format", choices=ROW_FORMATS + ("all",), default="all")
    args = parser.parse_args()

    tokenizer = make_tokenizer()
    formats = ROW_FORMATS if args.row_format == "all" else (args.row_format,)
    for row_format in formats:
        result = run(args.batch, args.input_length, args.repeats, row_format, tokenizer=tokenizer)
        print(
            f"batch {result['batch']}, input_length {result['input_length']} (rows of {result['raw_length']} "
            f"tokens, {result['row_format']}): vectorized {result['vectorized_ms']:.3f} ms/batch, per-row "
            f"{result['per_row_ms']:.3f} ms/batch, speed-up {result['speedup']:.1f}x"
        )


if __name__ == "__main__":
    main()
