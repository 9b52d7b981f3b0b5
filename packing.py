"""Text to fixed-length rows of token ids, fast, for run_mlm.py and run_span_t5.py (packing, as in the Hugging
Face examples: no padding at all). `TokenIds` gives a tokenizer's ids without the work `tokenizer(...)` throws
away; `pack_token_ids` joins them and cuts rows in Arrow, without a Python object per token. `require_blocks`
says which data is too short for one row.
"""

import json
from itertools import chain

import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import IterableDataset

import data_utils
from arguments import UserError


def pack_token_ids(batch, block_size):
    """Join the tokens of a batch of texts and cut them into rows of exactly `block_size` (the tail that fills
    no row is dropped, as in the Hugging Face examples). `batch`: what a tokenizer returned, or a pyarrow Table
    of such list columns; each list column is packed alike (offset_mapping too). Flattening and re-slicing
    Arrow arrays is zero-copy: no Python object per token. Returns a pyarrow Table, which `map` writes as is."""
    if not isinstance(batch, pa.Table):
        batch = pa.table({name: pa.array(values, type=pa.list_(pa.int32()) if name == "input_ids" else None)
                          for name, values in batch.items()})
    packed = {}
    for name in batch.column_names:
        column = batch[name]
        flat = pc.list_flatten(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
        width = 1
        while hasattr(flat.type, "value_type"):  # offsets are (start, end) pairs: keep the pairs together
            width = flat.type.list_size if hasattr(flat.type, "list_size") and flat.type.list_size > 0 else 2
            flat = pc.list_flatten(flat)
        if flat.type != pa.int32():
            flat = flat.cast(pa.int32())
        usable = len(flat) // (block_size * width) * block_size * width
        rows = pa.FixedSizeListArray.from_arrays(flat.slice(0, usable), width) if width > 1 else flat.slice(0, usable)
        packed[name] = pa.FixedSizeListArray.from_arrays(rows, block_size)
    return pa.table(packed)


def non_blank(texts):
    """The texts of a batch column (a list, a pyarrow array, any iterable) that are not empty or whitespace only."""
    if not isinstance(texts, list):
        texts = texts.to_pylist() if hasattr(texts, "to_pylist") else list(texts)
    return [t for t in texts if t and not t.isspace()]


class TokenIds:
    """`encode = TokenIds(tokenizer)`, then `encode(texts)` -> {"input_ids": [...] per text}: the ids that
    `tokenizer(texts)` returns, computed faster. Build it after the last change to the tokenizer.

    A fast tokenizer's `encode_batch_fast` skips the character offsets `tokenizer(...)` computes and drops.
    BERT's normalizer works character by character and its pre-tokenizer splits at every space, so a text's
    ids are its space-separated pieces' ids joined: each distinct piece is tokenized once and looked up after
    that (benchmarks/RESULTS.md). Other tokenizers, or an added token with a space in it, take whole texts.
    """

    # What it remembers is forgotten and gathered afresh beyond this many pieces or characters (text without
    # spaces, such as Chinese, makes every line one long piece): about 100-400 MB at most.
    MAX_PIECES, MAX_CHARACTERS = 500_000, 10_000_000

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.pieces = None  # piece -> its ids, where a text's ids are its pieces' ids (see above)
        self.characters = 0  # in the remembered pieces
        if self.backend is None or getattr(self.backend, "encode_batch_fast", None) is None:
            self.backend = None
            return
        if self.backend.truncation is not None:
            self.backend.no_truncation()
        if self.backend.padding is not None:
            self.backend.no_padding()
        self.around = self._special_ids_around(self.backend) if self._splits_at_spaces(self.backend) else None
        if self.around is not None:
            self.pieces = {}

    @staticmethod
    def _splits_at_spaces(backend):
        """Whether this tokenizer's ids for a text are its space-separated pieces' ids, joined."""
        config = json.loads(backend.to_str())
        if (config.get("normalizer") or {}).get("type") != "BertNormalizer":
            return False
        if (config.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
            return False
        return not any(any(c.isspace() for c in token.content) for token in backend.get_added_tokens_decoder().values())

    @staticmethod
    def _special_ids_around(backend):
        """(ids before, ids after) a text's own ids with special tokens, or None if they vary by text."""
        found = set()
        for probe in ("a", "the end ."):
            full = backend.encode(probe, add_special_tokens=True).ids
            own = backend.encode(probe, add_special_tokens=False).ids
            starts = [i for i in range(len(full) - len(own) + 1) if full[i : i + len(own)] == own]
            if len(starts) != 1 or not own:
                return None
            found.add((tuple(full[: starts[0]]), tuple(full[starts[0] + len(own) :])))
        if len(found) != 1:
            return None
        before, after = found.pop()
        return (before, after) if backend.encode("", add_special_tokens=True).ids == [*before, *after] else None

    def __call__(self, texts):
        if self.backend is None:
            return dict(self.tokenizer(texts, return_attention_mask=False, return_token_type_ids=False, verbose=False))
        if self.pieces is None:
            return {"input_ids": [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=True)]}
        if len(self.pieces) > self.MAX_PIECES or self.characters > self.MAX_CHARACTERS:
            self.pieces.clear()
            self.characters = 0
        try:
            return {"input_ids": self._join(texts)}
        except KeyError:  # pieces not seen before: tokenize them all in one call, then join
            new = list(set(chain.from_iterable(text.split(" ") for text in texts)).difference(self.pieces))
            self.characters += sum(map(len, new))
            for piece, encoding in zip(new, self.backend.encode_batch_fast(new, add_special_tokens=False)):
                self.pieces[piece] = encoding.ids
            return {"input_ids": self._join(texts)}

    def _join(self, texts):
        (before, after), ids_of = self.around, self.pieces.__getitem__
        return [[*before, *chain.from_iterable(map(ids_of, text.split(" "))), *after] for text in texts]


def _split_source(data_args, split):
    """How the user named a split's data, for messages."""
    if data_args.dataset_name:
        return f"--dataset_name {data_args.dataset_name!r} split {split!r}"
    named = data_args.train_file if split == "train" else data_args.validation_file
    if named:
        return f"--{split}_file {named!r}"
    if split == "validation":
        return f"the {data_args.validation_split_percentage}% of the training data held out for validation"
    return "the training data"


def require_blocks(splits, raw, text_column, tokenizer, data_args, block):
    """One clear error when a split's text is shorter than one block, so it packed to no rows: which data, how
    many tokens it has, the block length. splits: {"train": dataset or None, ...}; a stream is checked by
    reading its first block."""
    for name, split in splits.items():
        streamed = isinstance(split, (IterableDataset, torch.utils.data.IterableDataset))
        empty = split is not None and (next(iter(split), None) is None if streamed else len(split) == 0)
        if empty:
            tokens = sum(len(ids) for batch in data_utils.batched_texts(raw.get(name, raw["train"]), text_column)
                         for ids in tokenizer(batch)["input_ids"])
            raise UserError(f"{_split_source(data_args, name)} has {tokens} tokens, fewer than one block of "
                            f"{block}; give more text or a smaller --max_seq_length")
