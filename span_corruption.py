"""T5's span-corruption objective (Raffel et al. 2020, section 3.1.4), readable on its own.

- `compute_t5_input_and_target_lengths`: how long to pack raw text so that corruption gives exactly
  `--max_seq_length` encoder tokens (fixed shapes, no padding);
- `DataCollatorForT5SpanCorruption`: masks ~15% of tokens in spans of mean length 3, vectorized over the batch;
- `train_t5_unigram_tokenizer`: a SentencePiece-style Unigram tokenizer with T5's 100 sentinels.

ADAPT: change the noise here (span lengths, sentinel layout, a different denoising objective); run_span_t5.py
only builds the collator and packs rows of `collator.raw_length` tokens.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_utils import BatchSeeds


def _t5_noise_counts(raw_length, noise_density, mean_noise_span_length):
    """(noise tokens, noise spans) for a chunk of `raw_length` tokens, as T5's random_spans_noise_mask counts
    them: round(length * density) noise tokens, round(noise / mean span length) spans."""
    num_noise = int(round(raw_length * noise_density))
    # Keep at least one token on each side: with no noise there is nothing to predict, with no kept token
    # there is no context.
    num_noise = min(max(num_noise, 1), raw_length - 1)
    num_spans = max(1, int(round(num_noise / mean_noise_span_length)))
    # Spans alternate kept / noise: at most one span per kept token (only reached at densities near 1), so two
    # spans never run together.
    num_spans = min(num_spans, raw_length - num_noise)
    return num_noise, num_spans


def _t5_corrupted_lengths(raw_length, noise_density, mean_noise_span_length):
    """(encoder length, decoder length) after span corruption of a chunk of `raw_length` tokens."""
    num_noise, num_spans = _t5_noise_counts(raw_length, noise_density, mean_noise_span_length)
    # Each span collapses to one sentinel in the inputs and is introduced by one in the labels; +1 for EOS.
    return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def compute_t5_input_and_target_lengths(inputs_length, noise_density=0.15, mean_noise_span_length=3.0):
    """Raw chunk length to pack texts into so that span corruption yields exactly `inputs_length` tokens.

    Returns `(raw_length, target_length)`: group tokenized texts into chunks of `raw_length` tokens, and
    every corrupted example will have `inputs_length` encoder tokens and `target_length` decoder tokens.
    For the T5 defaults: 128 -> (141, 29), 256 -> (284, 58), 512 -> (568, 114), 1024 -> (1137, 229).

    The same numbers as T5's random_spans_helper, including its noise_density 0.5 step back to equal input and
    target lengths (128 -> (190, 128)). Where that helper counts 0 spans (short rows, long spans: 16 tokens,
    mean span 8), the noise mask still makes one span, so the helper's length would corrupt to one token too
    many; this walk counts as the mask does (16 -> (17, 5), not the helper's (18, 4)).
    """
    if inputs_length < 3:
        raise ValueError(f"inputs_length must be at least 3 (one kept token, one sentinel, EOS), got {inputs_length}")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")

    def encoder_length(raw_length):
        return _t5_corrupted_lengths(raw_length, noise_density, mean_noise_span_length)[0]

    # One more raw token never shrinks the corrupted input, and inputs_length - 1 raw tokens always fit
    # (each span removes at least as many tokens as its sentinel adds), so walk up from there.
    raw_length = max(2, inputs_length - 1)
    while encoder_length(raw_length + 1) <= inputs_length:
        raw_length += 1
    target_length = _t5_corrupted_lengths(raw_length, noise_density, mean_noise_span_length)[1]
    # T5 steps back one raw token at density 0.5 when targets come out longer than inputs.
    if noise_density == 0.5 and target_length > inputs_length and encoder_length(raw_length - 1) == inputs_length:
        raw_length -= 1
        target_length = _t5_corrupted_lengths(raw_length, noise_density, mean_noise_span_length)[1]
    return raw_length, target_length


def _t5_sentinel_ids(tokenizer, num_sentinels):
    """Ids of `<extra_id_0>` .. `<extra_id_{num_sentinels-1}>`, or a ValueError saying how to get them."""
    tokens = [f"<extra_id_{k}>" for k in range(num_sentinels)]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    # Unknown tokens come back as the unk id (or None when there is no unk token), never as an error.
    missing = [token for token, token_id in zip(tokens, ids) if token_id is None or token_id == tokenizer.unk_token_id]
    if missing:
        raise ValueError(
            f"tokenizer has no {missing[0]} sentinel token ({len(missing)} of the {num_sentinels} sentinels that "
            "span corruption needs at this length are missing); use a T5 tokenizer or train one with sentinels "
            "(train_t5_unigram_tokenizer)"
        )
    return np.asarray(ids, dtype=np.int64)


def _stack_token_rows(examples):
    """(batch, length) int64 array from rows given as dicts with "input_ids" or as plain token sequences."""
    rows = [example["input_ids"] if isinstance(example, Mapping) else example for example in examples]
    if len(rows) == 0:
        raise ValueError("cannot collate an empty batch")
    try:
        if isinstance(rows[0], torch.Tensor):
            batch = torch.stack(rows).numpy()
        elif isinstance(rows[0], np.ndarray):
            batch = np.stack(rows)
        else:
            # Naming the dtype spares numpy a pass over every Python int to infer it.
            batch = np.array(rows, dtype=np.int64)
    except (ValueError, RuntimeError) as error:
        raise ValueError(
            "all rows must have the same number of tokens; pack texts into chunks of the raw length from "
            "compute_t5_input_and_target_lengths"
        ) from error
    if batch.ndim != 2:
        raise ValueError(f"expected a batch of token-id rows, got an array of shape {batch.shape}")
    return batch.astype(np.int64, copy=False)


def _random_segment_lengths(rng, total, num_segments, batch_size):
    """Split `total` into `num_segments` positive lengths, uniformly over all such splits, for every row."""
    if num_segments == 1:
        return np.full((batch_size, 1), total, dtype=np.int64)
    # A split is a choice of num_segments - 1 cut points among the total - 1 gaps between tokens. The gaps
    # with the smallest random keys are such a subset, uniformly; np.partition finds the threshold key of
    # every row at once (much faster than argpartition or shuffling each row).
    num_cuts = num_segments - 1
    keys = rng.random((batch_size, total - 1))
    threshold = np.partition(keys, num_cuts - 1, axis=1)[:, num_cuts - 1 : num_cuts]
    is_cut = keys <= threshold
    if np.count_nonzero(is_cut) != batch_size * num_cuts:
        # Equal keys at the threshold (about once in 10^10 rows) would give a row extra cuts; redrawing the
        # batch keeps the choice uniform.
        return _random_segment_lengths(rng, total, num_segments, batch_size)
    # Flat indices come out row by row in increasing order, so each row's cuts arrive sorted.
    cuts = np.flatnonzero(is_cut).reshape(batch_size, num_cuts) % (total - 1) + 1
    edges = np.concatenate(
        [np.zeros((batch_size, 1), dtype=np.int64), cuts, np.full((batch_size, 1), total, dtype=np.int64)], axis=1
    )
    return np.diff(edges, axis=1)


@dataclass
class DataCollatorForT5SpanCorruption:
    """T5's span-corruption objective as a data collator (Raffel et al. 2020, `random_spans_noise_mask`).

    Every row must hold exactly `raw_length` tokens, where
    `raw_length, target_length = compute_t5_input_and_target_lengths(input_length, ...)`. Per row,
    round(raw_length * noise_density) tokens are masked in spans averaging `mean_noise_span_length` tokens;
    the encoder sees the kept tokens with each masked span replaced by one sentinel `<extra_id_k>`, and the
    decoder predicts each sentinel followed by the tokens it hid:

        original:  The cute dog walks in the park
        inputs:    The <extra_id_0> walks in <extra_id_1> park </s>
        labels:    <extra_id_0> cute dog <extra_id_1> the </s>

    Returns LongTensors `input_ids (B, input_length)`, `labels (B, target_length)` and
    `decoder_input_ids (B, target_length)`. Shapes are fixed and nothing is padded, so no attention masks
    are returned (the model treats a missing mask as all ones).
    """

    tokenizer: Any
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    input_length: int = 512
    target_length: int | None = None
    decoder_start_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self):
        self.raw_length, expected_target_length = compute_t5_input_and_target_lengths(
            self.input_length, self.noise_density, self.mean_noise_span_length
        )
        if self.target_length is None:
            self.target_length = expected_target_length
        elif self.target_length != expected_target_length:
            raise ValueError(
                f"target_length={self.target_length} does not match input_length={self.input_length}: span "
                f"corruption of {self.raw_length}-token rows gives {expected_target_length} target tokens "
                "(see compute_t5_input_and_target_lengths)"
            )
        corrupted_input_length, _ = _t5_corrupted_lengths(
            self.raw_length, self.noise_density, self.mean_noise_span_length
        )
        if corrupted_input_length != self.input_length:
            raise ValueError(
                f"no raw chunk length corrupts to exactly input_length={self.input_length} with "
                f"noise_density={self.noise_density}; use input_length={corrupted_input_length}"
            )
        # All rows have the same length, so they all get the same number of noise tokens and spans; only
        # where the spans fall differs.
        self.num_noise_tokens, self.num_noise_spans = _t5_noise_counts(
            self.raw_length, self.noise_density, self.mean_noise_span_length
        )
        # T5 tokenizers put <extra_id_k> at len(tokenizer) - 1 - k, but looking the ids up also works for
        # tokenizers that add sentinels in another order, and catches tokenizers that have none.
        self.sentinel_ids = _t5_sentinel_ids(self.tokenizer, self.num_noise_spans)
        self.eos_token_id = self.tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token; T5 span corruption ends inputs and labels with it")
        if self.decoder_start_token_id is None:
            # T5 starts decoding from the pad token.
            self.decoder_start_token_id = self.tokenizer.pad_token_id
        if self.decoder_start_token_id is None:
            raise ValueError("tokenizer has no pad_token; pass decoder_start_token_id explicitly")
        self._batch_seeds = None

    def _generator(self):
        # A fresh generator per batch from (seed, rank, batch number): workers and processes never repeat
        # each other's masks, and a run resumed from a checkpoint draws the masks the uninterrupted run drew.
        if self._batch_seeds is None:
            self._batch_seeds = BatchSeeds(np.random.SeedSequence().entropy if self.seed is None else self.seed)
        return np.random.default_rng(self._batch_seeds.next())

    @property
    def batch_seeds(self):
        if self._batch_seeds is None:
            self._generator()
            self._batch_seeds.restart(0)
        return self._batch_seeds

    def __call__(self, examples):
        tokens = _stack_token_rows(examples)
        if tokens.shape[1] != self.raw_length:
            got_input, got_target = _t5_corrupted_lengths(
                tokens.shape[1], self.noise_density, self.mean_noise_span_length
            )
            raise ValueError(
                f"rows have {tokens.shape[1]} tokens, which span-corrupt to {got_input} input / {got_target} "
                f"target tokens, but this collator makes input_length={self.input_length} / "
                f"target_length={self.target_length}; pack texts into chunks of {self.raw_length} tokens "
                "(compute_t5_input_and_target_lengths)"
            )
        input_ids, labels = self.corrupt(tokens, self._generator())
        decoder_input_ids = np.empty_like(labels)
        decoder_input_ids[:, 0] = self.decoder_start_token_id
        decoder_input_ids[:, 1:] = labels[:, :-1]
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "decoder_input_ids": torch.from_numpy(decoder_input_ids),
        }

    # ADAPT: the noise (where spans fall, what replaces them, what the decoder predicts).
    def corrupt(self, tokens, rng):
        """Span-corrupt a (batch, raw_length) int64 array; returns numpy (input_ids, labels)."""
        batch_size, length = tokens.shape
        num_noise, num_spans = self.num_noise_tokens, self.num_noise_spans

        # Lay out spans as kept_0, noise_0, kept_1, noise_1, ...: the first token is always kept and the
        # last always masked, as in T5.
        kept_lengths = _random_segment_lengths(rng, length - num_noise, num_spans, batch_size)
        noise_lengths = _random_segment_lengths(rng, num_noise, num_spans, batch_size)
        span_lengths = np.stack([kept_lengths, noise_lengths], axis=2).reshape(batch_size, 2 * num_spans)
        span_starts = np.cumsum(span_lengths, axis=1)[:, :-1]  # where noise_0, kept_1, noise_1, ... begin
        noise_starts, kept_starts = span_starts[:, 0::2], span_starts[:, 1::2]

        is_span_start = np.zeros((batch_size, length), dtype=bool)
        is_span_start[:, 0] = True
        np.put_along_axis(is_span_start, span_starts, True, axis=1)
        # Position i lies in noise when an even number of spans (kept_0 included) start at or before it.
        is_noise = (np.cumsum(is_span_start, axis=1) & 1) == 0

        # Inputs keep the kept tokens plus the first token of each noise span, overwritten with the span's
        # sentinel; labels keep the noise tokens plus the first token of each kept span, overwritten with the
        # sentinel of the noise span that follows it. Every row keeps the same number of positions, so a
        # boolean selection followed by a reshape recovers the rows.
        sentinels = self.sentinel_ids[:num_spans]
        input_ids = tokens.copy()
        np.put_along_axis(input_ids, noise_starts, sentinels[None, :], axis=1)
        input_ids = input_ids[~is_noise | is_span_start]
        labels = tokens.copy()
        labels[:, 0] = sentinels[0]
        np.put_along_axis(labels, kept_starts, sentinels[None, 1:], axis=1)
        labels = labels[is_noise | is_span_start]
        eos = np.full((batch_size, 1), self.eos_token_id, dtype=np.int64)
        input_ids = np.concatenate([input_ids.reshape(batch_size, -1), eos], axis=1)
        labels = np.concatenate([labels.reshape(batch_size, -1), eos], axis=1)
        return input_ids, labels


def train_t5_unigram_tokenizer(text_iterator, vocab_size, output_dir=None, num_sentinels=100, model_max_length=512):
    """Train a T5-style SentencePiece Unigram tokenizer with sentinels for span corruption.

    `vocab_size` is the size of the learned Unigram vocabulary (including `<pad>`=0, `</s>`=1, `<unk>`=2);
    the `num_sentinels` tokens `<extra_id_k>` come on top at id `len(tokenizer) - 1 - k`, as in T5
    (32000 + 100 = 32100). A tiny corpus may yield fewer pieces than asked for. Every encoded sequence
    ends with `</s>`. `model_max_length` is T5's 512; T5's relative position buckets do not hard-limit
    length, so it only sets the default truncation length. If `output_dir` is given the tokenizer is saved
    there and checked to reload unchanged with `AutoTokenizer.from_pretrained(output_dir)`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    # T5's SentencePiece model also applies NFKC and collapses runs of spaces.
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],  # ids 0, 1, 2 in this order, as in T5
        unk_token="<unk>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(text_iterator, trainer=trainer)

    # Added tokens get consecutive ids after the learned vocabulary, so adding the sentinels from the highest
    # down leaves <extra_id_0> last: span corruption code that assumes T5's layout works unchanged.
    sentinels = [f"<extra_id_{k}>" for k in range(num_sentinels)]
    tokenizer.add_special_tokens(list(reversed(sentinels)))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if [tokenizer.token_to_id(token) for token in sentinels] != [size - 1 - k for k in range(num_sentinels)]:
        raise RuntimeError("sentinel tokens did not land at len(tokenizer) - 1 - k; is <extra_id_k> in the corpus?")
    eos_id = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=sentinels,  # so decode(skip_special_tokens=True) drops them, like T5's extra_ids
        model_max_length=model_max_length,
    )
    if output_dir is not None:
        hf_tokenizer.save_pretrained(output_dir)
        reloaded = AutoTokenizer.from_pretrained(output_dir)
        if reloaded.get_vocab() != hf_tokenizer.get_vocab() or reloaded.all_special_ids != hf_tokenizer.all_special_ids:
            raise RuntimeError(f"tokenizer saved to {output_dir} does not reload with the same ids")
    return hf_tokenizer
