"""Tests for T5 span corruption in data_utils: lengths, the batched collator, and the Unigram tokenizer.

The collator is checked against properties of the objective rather than against itself: every output
must merge back into the original chunk, with the noise and span counts T5 prescribes.
"""

import importlib.util
import os
import pydoc_data.topics
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from span_corruption import (
    DataCollatorForT5SpanCorruption,
    _random_segment_lengths,
    compute_t5_input_and_target_lengths,
    train_t5_unigram_tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corpus_texts(max_chars=12_000):
    """A few KB of English prose that ships with Python, so nothing has to be downloaded."""
    texts, size = [], 0
    for text in pydoc_data.topics.topics.values():
        texts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    return train_t5_unigram_tokenizer(corpus_texts(), vocab_size=300)


def sentinel_ids(tokenizer, count):
    return tokenizer.convert_tokens_to_ids([f"<extra_id_{k}>" for k in range(count)])


def t5_counts(raw_length, density=0.15, mean_span=3.0):
    """Noise tokens and spans per row as T5's random_spans_noise_mask counts them, written out independently
    of span_corruption.py; spans capped at the kept tokens, so a kept token separates every two spans."""
    noise = min(max(int(round(raw_length * density)), 1), raw_length - 1)
    spans = max(int(round(noise / mean_span)), 1)
    return noise, min(spans, raw_length - noise)


def t5_random_spans_helper(inputs_length, density, mean_span):
    """T5's random_spans_helper (t5/data/preprocessors.py), written out: (raw tokens, target length), and
    whether T5's noise mask counts noise and spans as the helper does at the lengths the helper compared (1 to
    `kept` spans) and, after its density-0.5 step back, still gives exactly inputs_length input tokens."""
    def lengths(tokens):
        noise = int(round(tokens * density))
        spans = int(round(noise / mean_span))
        return tokens - noise + spans + 1, noise + spans + 1, 1 <= noise < tokens and 1 <= spans <= tokens - noise

    tokens = inputs_length - 1
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    inputs, targets, agrees = lengths(tokens)
    agrees = agrees and lengths(tokens + 1)[2]
    if density == 0.5 and targets > inputs:
        tokens, targets = tokens - 1, targets - 1
        inputs, _, agrees_here = lengths(tokens)
        agrees = agrees and agrees_here and inputs == inputs_length
    return tokens, targets, agrees


def regular_token_rows(tokenizer, rng, batch, length):
    """Random ids of ordinary pieces (no pad/eos/unk, no sentinels), so sentinels in outputs are unambiguous."""
    return rng.integers(3, len(tokenizer) - 100, size=(batch, length))


def check_corruption(tokens, batch, tokenizer, input_length, target_length, decoder_start_token_id=0):
    """Assert that `batch` is a valid T5 span corruption of the rows in `tokens`."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    rows, raw_length = tokens.shape
    assert input_ids.dtype == labels.dtype == batch["decoder_input_ids"].dtype == torch.long
    assert input_ids.shape == (rows, input_length)
    assert labels.shape == batch["decoder_input_ids"].shape == (rows, target_length)
    num_noise, num_spans = t5_counts(raw_length)
    sentinels = sentinel_ids(tokenizer, num_spans)
    eos = tokenizer.eos_token_id

    for original, inputs, targets in zip(tokens.tolist(), input_ids.tolist(), labels.tolist()):
        assert inputs[-1] == eos and targets[-1] == eos
        inputs, targets = inputs[:-1], targets[:-1]
        # Sentinels appear once per span, in order, in both sequences.
        assert [t for t in inputs if t in sentinels] == sentinels
        assert [t for t in targets if t in sentinels] == sentinels
        assert len(targets) - num_spans == num_noise
        # The first token is kept, the last is masked, and no span is empty.
        assert inputs[0] == original[0] and targets[0] == sentinels[0]
        assert inputs[-1] == sentinels[-1] and targets[-1] == original[-1]
        for sequence in (inputs, targets):
            assert all(not (a in sentinels and b in sentinels) for a, b in zip(sequence, sequence[1:]))

        # Swap every sentinel in the inputs for the tokens that follow it in the labels.
        hidden, current = {}, None
        for token in targets:
            if token in sentinels:
                current = token
                hidden[current] = []
            else:
                hidden[current].append(token)
        rebuilt = []
        for token in inputs:
            rebuilt.extend(hidden[token] if token in sentinels else [token])
        assert rebuilt == original

    expected_decoder_inputs = torch.cat(
        [torch.full((rows, 1), decoder_start_token_id, dtype=torch.long), labels[:, :-1]], dim=1
    )
    assert torch.equal(batch["decoder_input_ids"], expected_decoder_inputs)


@pytest.mark.parametrize(
    "inputs_length, expected", [(128, (141, 29)), (256, (284, 58)), (512, (568, 114)), (1024, (1137, 229))]
)
def test_lengths_table(inputs_length, expected):
    assert compute_t5_input_and_target_lengths(inputs_length) == expected


@pytest.mark.parametrize("density, mean_span", [(0.15, 3.0), (0.3, 8.0), (0.5, 3.0), (0.5, 1.0), (0.6, 3.0), (0.8, 3.0)])
def test_lengths_are_t5s_wherever_t5s_mask_agrees_with_its_helper(density, mean_span):
    """The lengths of T5's random_spans_helper, for every input length from 4 to 699. T5's helper and its noise
    mask disagree where the helper counts 0 spans (the mask makes 1: lengths below 10-13 here), more spans
    than kept tokens (density 0.8 with spans of 3, everywhere), or steps back at density 0.5 to fewer input
    tokens than asked (1 length in 8 with spans of 3); there the raw length is the one whose corruption,
    counted as the mask counts, is exactly the input length (or, none existing, the largest below it)."""
    def lengths(raw):
        noise, spans = t5_counts(raw, density, mean_span)
        return raw - noise + spans + 1, noise + spans + 1

    for n in range(4, 700):
        raw, target = compute_t5_input_and_target_lengths(n, density, mean_span)
        t5_raw, t5_target, helper_agrees_with_mask = t5_random_spans_helper(n, density, mean_span)
        if helper_agrees_with_mask:
            assert (raw, target) == (t5_raw, t5_target), n
        assert target == lengths(raw)[1]
        assert lengths(raw)[0] <= n < lengths(raw + 1)[0] or (density == 0.5 and lengths(raw)[0] == n)


def test_t5s_own_examples():
    """The cases the issue measured against T5: density 0.5 steps back to equal lengths; 0.6 spans average
    about mean_noise_span_length (not fewer, longer spans); a short row with long spans corrupts to its length."""
    assert compute_t5_input_and_target_lengths(128, 0.5) == (190, 128)
    assert compute_t5_input_and_target_lengths(256, 0.5) == (382, 256)
    noise, spans = t5_counts(128, 0.6)
    assert (noise, spans) == (77, 26)  # T5: round(77 / 3) spans of 2.96 tokens on average
    raw, target = compute_t5_input_and_target_lengths(16, 0.15, 8.0)
    assert (raw, target) == (17, 5) and t5_random_spans_helper(16, 0.15, 8.0) == (18, 4, False)


def test_collator_properties_over_random_lengths_and_seeds(tokenizer):
    rng = np.random.default_rng(1234)
    lengths = sorted(set(rng.integers(8, 601, size=60).tolist()) | {8, 9, 10, 128, 512, 600})
    for case, input_length in enumerate(lengths):
        collator = DataCollatorForT5SpanCorruption(tokenizer, input_length=input_length, seed=case)
        assert (collator.raw_length, collator.target_length) == compute_t5_input_and_target_lengths(input_length)
        for batch_size in (1, 3):
            tokens = regular_token_rows(tokenizer, rng, batch_size, collator.raw_length)
            batch = collator([{"input_ids": row} for row in tokens.tolist()])
            check_corruption(tokens, batch, tokenizer, input_length, collator.target_length)


def test_other_densities_and_decoder_start(tokenizer):
    rng = np.random.default_rng(0)
    collator = DataCollatorForT5SpanCorruption(
        tokenizer, noise_density=0.3, mean_noise_span_length=5.0, input_length=100, decoder_start_token_id=7, seed=0
    )
    tokens = regular_token_rows(tokenizer, rng, 4, collator.raw_length)
    batch = collator(list(tokens))
    noise, spans = t5_counts(collator.raw_length, 0.3, 5.0)
    assert batch["labels"].shape == (4, noise + spans + 1)
    assert torch.equal(batch["decoder_input_ids"][:, 0], torch.full((4,), 7))
    assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])


def test_row_formats_and_seeding(tokenizer):
    tokens = regular_token_rows(tokenizer, np.random.default_rng(0), 4, 568)
    formats = [
        [{"input_ids": row} for row in tokens.tolist()],
        [{"input_ids": row, "attention_mask": [1] * len(row)} for row in tokens],
        [{"input_ids": torch.from_numpy(row)} for row in tokens],
        tokens.tolist(),
        [tuple(row) for row in tokens.tolist()],
    ]
    outputs = [DataCollatorForT5SpanCorruption(tokenizer, seed=3)(rows) for rows in formats]
    for output in outputs[1:]:
        for key in outputs[0]:
            assert torch.equal(output[key], outputs[0][key])

    collator = DataCollatorForT5SpanCorruption(tokenizer, seed=4)
    first, second = collator(formats[0]), collator(formats[0])
    assert not torch.equal(first["input_ids"], second["input_ids"])  # fresh masks every batch
    assert not torch.equal(first["input_ids"], outputs[0]["input_ids"])  # another seed, other masks
    unseeded = DataCollatorForT5SpanCorruption(tokenizer)
    assert not torch.equal(unseeded(formats[0])["input_ids"], unseeded(formats[0])["input_ids"])


def test_random_segment_lengths_are_uniform_compositions():
    rng = np.random.default_rng(0)
    draws = np.concatenate([_random_segment_lengths(rng, 6, 3, 500) for _ in range(8)])
    assert (draws > 0).all() and (draws.sum(axis=1) == 6).all()
    counts = Counter(map(tuple, draws.tolist()))
    assert len(counts) == 10  # C(5, 2) ways to split 6 into 3 positive parts
    assert min(counts.values()) > 0.8 * len(draws) / 10 and max(counts.values()) < 1.2 * len(draws) / 10
    assert (_random_segment_lengths(rng, 7, 1, 4) == 7).all()
    assert (_random_segment_lengths(rng, 7, 7, 4) == 1).all()


def test_dataloader_workers_draw_different_masks(tokenizer):
    # Each worker holds a copy of the collator; copies of one generator would mask identically.
    tokens = regular_token_rows(tokenizer, np.random.default_rng(0), 1, 141)
    rows = [{"input_ids": tokens[0].tolist()}] * 4
    collator = DataCollatorForT5SpanCorruption(tokenizer, input_length=128, seed=0)
    collator(rows)  # the main process's generator exists before the workers are forked

    def one_epoch():
        torch.manual_seed(0)  # what Trainer's set_seed does; worker seeds derive from it
        loader = torch.utils.data.DataLoader(rows, batch_size=1, num_workers=2, collate_fn=collator)
        return [batch["input_ids"] for batch in loader]

    first_epoch, second_epoch = one_epoch(), one_epoch()
    assert not torch.equal(first_epoch[0], first_epoch[1])  # first batch of worker 0 vs worker 1
    assert all(torch.equal(a, b) for a, b in zip(first_epoch, second_epoch))  # reproducible under a seed


def test_bad_rows_and_lengths_are_refused(tokenizer):
    collator = DataCollatorForT5SpanCorruption(tokenizer, input_length=128)
    with pytest.raises(ValueError, match="pack texts into chunks of 141 tokens"):
        collator([[5] * 140, [5] * 140])
    with pytest.raises(ValueError, match="same number of tokens"):
        collator([[5] * 141, [5] * 140])
    with pytest.raises(ValueError, match="target_length"):
        DataCollatorForT5SpanCorruption(tokenizer, input_length=128, target_length=30)


def test_tokenizer_without_sentinels_is_refused():
    no_sentinels = train_t5_unigram_tokenizer(corpus_texts(4000), vocab_size=200, num_sentinels=0)
    with pytest.raises(ValueError, match="no <extra_id_0> sentinel token.*use a T5 tokenizer or train one"):
        DataCollatorForT5SpanCorruption(no_sentinels, input_length=64)
    # 512 needs 28 sentinels per row; 5 are not enough.
    too_few = train_t5_unigram_tokenizer(corpus_texts(4000), vocab_size=200, num_sentinels=5)
    DataCollatorForT5SpanCorruption(too_few, input_length=40)
    with pytest.raises(ValueError, match="no <extra_id_5> sentinel token"):
        DataCollatorForT5SpanCorruption(too_few, input_length=512)


def test_unigram_tokenizer_layout_and_reload(tokenizer, tmp_path):
    size = len(tokenizer)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert sentinel_ids(tokenizer, 100) == [size - 1 - k for k in range(100)]
    assert tokenizer.convert_tokens_to_ids("<extra_id_100>") == tokenizer.unk_token_id
    text = "The  quick brown fox <extra_id_0> jumps ﬁne"  # a double space, a sentinel, an NFKC ligature
    ids = tokenizer(text)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and ids.count(size - 1) == 1
    assert "<extra_id_0>" not in tokenizer.decode(ids, skip_special_tokens=True)

    # Unigram training is multi-threaded and not bit-reproducible, so compare against the saved instance.
    saved = train_t5_unigram_tokenizer(corpus_texts(), vocab_size=300, output_dir=str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.get_vocab() == saved.get_vocab()
    assert len(reloaded) == len(saved)
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.unk_token_id) == (0, 1, 2)
    assert sentinel_ids(reloaded, 100) == sentinel_ids(saved, 100) == [size - 1 - k for k in range(100)]
    assert reloaded(text)["input_ids"] == saved(text)["input_ids"]
    assert reloaded.model_max_length == saved.model_max_length == 512


def test_collator_on_real_text(tokenizer):
    collator = DataCollatorForT5SpanCorruption(tokenizer, input_length=64, seed=0)
    ids = np.concatenate([tokenizer(text)["input_ids"] for text in corpus_texts(6000)])
    tokens = ids[: len(ids) // collator.raw_length * collator.raw_length].reshape(-1, collator.raw_length)
    batch = collator([{"input_ids": row} for row in tokens])
    check_corruption(tokens, batch, tokenizer, 64, collator.target_length)
    assert "<extra_id_0>" in tokenizer.decode(batch["input_ids"][0])


def test_benchmark_reference_is_the_same_objective(tokenizer):
    path = os.path.join(ROOT, "benchmarks", "t5_collator.py")
    spec = importlib.util.spec_from_file_location("t5_collator_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    collator = DataCollatorForT5SpanCorruption(tokenizer, input_length=256)
    tokens = regular_token_rows(tokenizer, np.random.default_rng(0), 3, collator.raw_length)
    batch = bench.per_row_span_corruption(
        [{"input_ids": row} for row in tokens],
        np.random.default_rng(0),
        collator.sentinel_ids,
        collator.eos_token_id,
        collator.decoder_start_token_id,
    )
    check_corruption(tokens, batch, tokenizer, 256, collator.target_length)
    result = bench.run(batch=4, input_length=128, repeats=2, tokenizer=tokenizer)
    assert result["raw_length"] == 141 and result["speedup"] > 0

