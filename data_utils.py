"""Small data utilities shared by run_mlm.py, run_span_t5.py and fine_tune_glue.py.

Only code that is identical across the scripts and not an edit point lives here: loading raw text from
the Hub or local files, the embedded offline corpus, fast packing of token ids, tokenized-data caching,
tokenizer training for from-scratch runs, and the T5 span-corruption objective.
"""

import hashlib
import logging
import os
import shutil
import sys
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk

from arguments import UserError

logger = logging.getLogger(__name__)

# Local file extension -> `datasets` builder name (and its options).
FILE_BUILDERS = {
    "txt": ("text", {}),
    "text": ("text", {}),
    "raw": ("text", {}),  # WikiText ships plain text as .raw
    "csv": ("csv", {}),
    "tsv": ("csv", {"sep": "\t", "quoting": 3}),  # 3 = csv.QUOTE_NONE: GLUE sentences hold bare quotes
    "json": ("json", {}),
    "jsonl": ("json", {}),
    "parquet": ("parquet", {}),
}


def cache_root(cache_dir=None):
    """Our own cache folder (embedded corpus, tokenized data), beside the `datasets` cache by default."""
    if cache_dir:
        return os.path.abspath(cache_dir)
    hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.environ.get("HF_SCRIPTS_CACHE", os.path.join(hf_home, "training_scripts"))


def write_embedded_corpus(cache_dir=None, validation_every=20):
    """Write the documentation text that ships inside every Python interpreter (`pydoc_data.topics`)
    as a train/validation pair of .txt files, one paragraph a line. Returns (train_path, validation_path).

    Nothing is downloaded or bundled, so `python run_mlm.py` works offline on a fresh machine.
    Every `validation_every`-th paragraph is held out.
    """
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            line = " ".join(block.split())
            if len(line) > 20:
                paragraphs.append(line)
    digest = hashlib.sha256("\n".join(paragraphs).encode()).hexdigest()[:12]
    folder = os.path.join(cache_root(cache_dir), "embedded_corpus", f"pydoc-{digest}")
    paths = (os.path.join(folder, "train.txt"), os.path.join(folder, "validation.txt"))
    if not all(os.path.isfile(p) for p in paths):  # written once: a stable mtime keeps the datasets cache valid
        os.makedirs(folder, exist_ok=True)
        parts = ([], [])
        for i, line in enumerate(paragraphs):
            parts[i % validation_every == validation_every - 1].append(line)
        for path, lines in zip(paths, parts):
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(tmp, path)
    return paths


def check_data_file(path, flag):
    """Fail early, with the fix, on a data file that cannot be read."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path!r} does not exist; check the path")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a folder; give a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag} {path!r} is not readable; fix its permissions (chmod +r)")
    if os.path.getsize(path) == 0:
        raise UserError(f"{flag} {path!r} is empty; give a file with data")
    if not path.endswith(".parquet"):
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as err:
            if err.start < len(head) - 4:  # not just a multi-byte character cut at the end of the sample
                raise UserError(
                    f"{flag} {path!r} is not UTF-8 text (bad byte at offset {err.start}); "
                    "convert it, e.g. iconv -f latin1 -t utf-8"
                )


def _load_file(path, flag, cache_dir, streaming):
    check_data_file(path, flag)
    extension = path.rsplit(".", 1)[-1].lower()
    builder, options = FILE_BUILDERS[extension]
    if builder == "text":
        options = {**options, "keep_linebreaks": False}
    try:
        return load_dataset(builder, data_files={"data": path}, split="data", cache_dir=cache_dir,
                            streaming=streaming, **options)
    except Exception as err:  # a parse error of a user's file: name the file and the reason
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(f"{flag} {path!r} could not be read as {extension}: {reason}") from err


def load_data_file(path, flag, cache_dir=None):
    """One local data file (any extension in FILE_BUILDERS) as a Dataset; a bad file raises UserError."""
    return _load_file(path, flag, cache_dir, streaming=False)


def read_glue_tsv(path, flag, names_if_no_header=None):
    """A TSV file of the original GLUE download as a Dataset of string columns named by its header.

    GLUE's files need what generic CSV readers do not do by default: sentences hold bare `"` (so no
    quoting at all), MRPC starts with a UTF-8 byte-order mark, and CoLA's train/dev files have no header
    row. For those, pass the column names: a first row that shares no cell with them is read as data.
    Rows whose cell count differs from the header's are skipped with a warning.
    """
    import csv

    check_data_file(path, flag)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    if not rows:
        raise UserError(f"{flag} {path!r} holds no rows; give a file with data")
    has_header = names_if_no_header is None or set(rows[0]) & set(names_if_no_header)
    header = rows.pop(0) if has_header else list(names_if_no_header)
    good = [row for row in rows if len(row) == len(header)]
    if len(good) < len(rows):
        logger.warning("%s: skipped %d of %d rows without %d tab-separated cells", path, len(rows) - len(good),
                       len(rows), len(header))
    return Dataset.from_dict({name: [row[i] for row in good] for i, name in enumerate(header)})


# The original GLUE download: one folder per task; MNLI has matched and mismatched dev/test sets ("_mm").
GLUE_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
MNLI_FILES = {"train": "train.tsv", "validation": "dev_matched.tsv", "validation_mm": "dev_mismatched.tsv",
              "test": "test_matched.tsv", "test_mm": "test_mismatched.tsv"}
HUB_GLUE_SPLITS = {"validation_matched": "validation", "validation_mismatched": "validation_mm",
                   "test_matched": "test", "test_mismatched": "test_mm"}  # nyu-mll/glue's MNLI split names
COLA_TSV_COLUMNS = ("source", "label", "original_label", "sentence")  # CoLA's train/dev files have no header
DO_FLAGS = {"train": "--do_train", "validation": "--do_eval", "test": "--do_predict"}


def load_glue_splits(wanted, files, task_name=None, data_dir=None, dataset_name=None, dataset_config_name=None,
                     cache_dir=None, token=None, validation_split_percentage=0, seed=42):
    """Raw splits train, validation, test (MNLI also validation_mm, test_mm) that `wanted` asks for, from
    `files` ({split: path}), else a GLUE task folder `data_dir`, else the Hub (`dataset_name`, or nyu-mll/glue
    for a GLUE task). With a task name, .tsv files are read in GLUE's own layout (read_glue_tsv). Without
    validation data, `validation_split_percentage` percent of train is held out (shuffled with `seed`)."""
    wanted = dict(wanted, validation_mm=wanted["validation"], test_mm=wanted["test"])
    paths = {split: (path, f"--{split}_file") for split, path in files.items() if path and wanted[split]}
    glue_files = (MNLI_FILES if task_name == "mnli" else GLUE_FILES) if data_dir else {}
    for split, name in glue_files.items():
        if wanted[split] and split not in paths and os.path.isfile(os.path.join(data_dir, name)):
            paths[split] = (os.path.join(data_dir, name), "--data_dir")
    if paths or data_dir:
        headerless = COLA_TSV_COLUMNS if task_name == "cola" else None
        raw = {split: read_glue_tsv(path, flag, headerless) if task_name and path.lower().endswith(".tsv")
               else load_data_file(path, flag, cache_dir) for split, (path, flag) in paths.items()}
    elif task_name or dataset_name:
        name = dataset_name or "nyu-mll/glue"
        try:
            hub = load_dataset(name, dataset_config_name or task_name, cache_dir=cache_dir, token=token)
        except Exception as err:  # offline, or a typo in the name
            raise UserError(f"could not load {name} from the Hub ({str(err).strip()[:200] or type(err).__name__}); "
                            "offline, give --data_dir path/to/glue_data/<TASK> or --train_file/--validation_file")
        raw = {HUB_GLUE_SPLITS.get(s, s): d for s, d in hub.items() if wanted.get(HUB_GLUE_SPLITS.get(s, s))}
    else:
        raise UserError("no data: give --task_name (GLUE), --dataset_name, or --train_file/--validation_file")
    # A GLUE folder must hold its dev set; elsewhere a share of train may stand in for a missing one.
    if wanted["validation"] and "validation" not in raw and "train" in raw and validation_split_percentage and not data_dir:
        held_out = raw["train"].train_test_split(validation_split_percentage / 100, seed=seed)
        raw["train"], raw["validation"] = held_out["train"], held_out["test"]
    for split, flag in DO_FLAGS.items():
        if wanted[split] and split not in raw:
            where = f"--data_dir {data_dir!r} has no {glue_files[split]}" if data_dir else f"there is no {split} data"
            raise UserError(f"{where}, which {flag} needs; give --{split}_file" + " or a GLUE task folder" * bool(task_name))
    return raw


class Seq2SeqCollator(DataCollatorForSeq2Seq):
    """DataCollatorForSeq2Seq that leaves `labels` out of unlabelled batches (a test set): transformers 5 sets
    labels=None there, and Seq2SeqTrainer's predict then runs the model for a loss without them and fails."""

    def __call__(self, features, return_tensors=None):
        batch = super().__call__(features, return_tensors)
        if batch.get("labels", 0) is None:
            del batch["labels"]
        return batch


def load_raw_datasets(model_args, data_args, seed=42):
    """Load raw 'train' and 'validation' splits from the Hub, from local files, or from the embedded corpus.

    When there is no validation data, the first `validation_split_percentage` percent of train is held out
    (as the Hugging Face examples do). Streaming keeps everything lazy.
    """
    streaming = data_args.streaming
    if data_args.dataset_name:
        raw = load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
            token=model_args.token, streaming=streaming,
        )
    else:
        train_file, validation_file = data_args.train_file, data_args.validation_file
        if train_file is None and validation_file is None:
            train_file, validation_file = write_embedded_corpus(model_args.cache_dir)
            logger.info("No dataset given: using Python's own documentation text as corpus (%s)", train_file)
        raw = {}
        if train_file:
            raw["train"] = _load_file(train_file, "--train_file", model_args.cache_dir, streaming)
        if validation_file:
            raw["validation"] = _load_file(validation_file, "--validation_file", model_args.cache_dir, streaming)
        raw = (IterableDatasetDict if streaming else DatasetDict)(raw)
    if "validation" not in raw and "train" in raw and data_args.validation_split_percentage > 0:
        train = raw["train"]
        if streaming:  # no length to take a percentage of: hold out a fixed number of leading examples
            n_val = data_args.max_eval_samples or 1000
            raw["validation"], raw["train"] = train.take(n_val), train.skip(n_val)
        else:
            n_val = max(1, len(train) * data_args.validation_split_percentage // 100)
            raw["validation"] = train.select(range(n_val))
            raw["train"] = train.select(range(n_val, len(train)))
    return raw


def column_names(raw_datasets):
    """The columns of the training split (else the validation split). A streaming dataset whose features are
    not declared up front (local text files, the first time they are read) is asked for its first example."""
    split = raw_datasets["train" if "train" in raw_datasets else "validation"]
    if split.features is not None:
        return list(split.features)
    first = next(iter(split), None)
    return list(first) if first is not None else []


def pick_text_column(column_names, wanted=None):
    """The column holding the text: `wanted` if given, else 'text', else the first column."""
    if wanted:
        if wanted not in column_names:
            raise UserError(f"no column {wanted!r} in the data (columns: {', '.join(column_names)}); fix --text_column_name")
        return wanted
    return "text" if "text" in column_names else column_names[0]


def pack_token_ids(batch, block_size):
    """Concatenate the tokens of a batch of documents and cut them into rows of exactly `block_size`.

    `batch` is what a tokenizer returned ({"input_ids": one list per text, ...}), or a pyarrow Table of such
    list columns. Lists become Arrow arrays in one C++ pass; flattening them and re-slicing the result into
    fixed-size rows are zero-copy, so no Python object is built per token. Every list column is packed the
    same way (input_ids, and offset_mapping for whole-word masking), ids as int32. The tail that does not
    fill a row is dropped, as in the Hugging Face examples. Returns a pyarrow Table, which `Dataset.map`
    writes as it is (and `IterableDataset.map` takes from a function over a dataset formatted as "arrow").
    """
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
    """`encode = TokenIds(tokenizer)`, then `encode(texts)` -> {"input_ids": one list of token ids per text, special
    tokens added}: what `tokenizer(texts, return_attention_mask=False, return_token_type_ids=False)` returns,
    computed faster. Build it once, after the last change to the tokenizer, and call it per batch: it remembers
    the pieces it has seen, tokenized as the tokenizer was then.

    For a fast (Rust) tokenizer this calls its `encode_batch_fast`, which skips the character offsets that
    `tokenizer(...)` always computes and then throws away (about 30% of tokenizing time). Many tokenizer.json
    files on the Hub (BERT's, MiniLM's) come with truncation and padding switched on in the Rust tokenizer;
    `tokenizer(...)` without truncation or padding switches them off before encoding, and so do we.

    BERT's tokenizers (BertNormalizer, then BertPreTokenizer) treat a space as the end of a word: the normalizer
    works character by character and the pre-tokenizer splits at every space. So a text's ids are the ids of its
    space-separated pieces, one after the other, between the special tokens the tokenizer adds. Natural text
    repeats its pieces ("the", "of", "1990,") over and over, so each piece is tokenized once, by the tokenizer
    itself, and looked up from then on (benchmarks/RESULTS.md, section 3: less CPU than the tokenizer alone
    even on text seen for the first time, and far less once a corpus repeats its pieces). An added token with
    a space in it could span two pieces: such a tokenizer, and any other normalizer or pre-tokenizer, takes
    the tokenizer for whole texts. Slow (Python) tokenizers take the usual call.
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
        import json

        config = json.loads(backend.to_str())
        if (config.get("normalizer") or {}).get("type") != "BertNormalizer":
            return False
        if (config.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
            return False
        return not any(any(c.isspace() for c in token.content) for token in backend.get_added_tokens_decoder().values())

    @staticmethod
    def _special_ids_around(backend):
        """(ids before, ids after) a text's own ids in `encode(text, add_special_tokens=True)`, or None when the
        tokenizer does not add the same tokens around every text."""
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


def token_ids(tokenizer, texts):
    """`TokenIds(tokenizer)(texts)`, for a single call (build a TokenIds once when encoding many batches)."""
    return TokenIds(tokenizer)(texts)


def tokenizer_fingerprint(tokenizer):
    """A stable hash of what a tokenizer does, for the tokenized-data cache key."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__name__, str(tokenizer.special_tokens_map), str(len(tokenizer))]
    parts.append(backend.to_str() if backend is not None else str(sorted(tokenizer.get_vocab().items())))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def cached_map(dataset, function, key_parts, cache_dir=None, overwrite=False, desc="Tokenizing", **map_kwargs):
    """`dataset.map(function, ...)`, saved to disk under a key made of the input's fingerprint and `key_parts`.

    A second run with the same data, tokenizer and settings (say, the next trial of a sweep) loads the
    result memory-mapped instead of tokenizing again. Streaming datasets are mapped lazily, never cached.
    """
    if isinstance(dataset, (IterableDataset, IterableDatasetDict)):
        map_kwargs.pop("num_proc", None)
        return dataset.map(function, **map_kwargs)
    fingerprints = {k: d._fingerprint for k, d in dataset.items()} if isinstance(dataset, DatasetDict) else dataset._fingerprint
    key = hashlib.sha256(repr((fingerprints, key_parts)).encode()).hexdigest()[:20]
    path = os.path.join(cache_root(cache_dir), "tokenized", key)
    if os.path.isdir(path) and not overwrite:
        try:
            loaded = load_from_disk(path)
            logger.info("Loaded tokenized data from cache %s", path)
            return loaded
        except Exception as err:  # a half-written or foreign folder: rebuild it
            logger.warning("Ignoring unreadable tokenized-data cache %s (%s)", path, err)

    def map_split(split, name):
        # Our key already says what the result depends on; naming the fingerprint spares datasets from
        # hashing `function` by pickling it (the tokenizer with its whole vocabulary: ~10% of tokenizing time).
        # That name does not change when `function` is edited, so datasets must never reuse its own cache file
        # for it: we only get here when our cache missed (or --overwrite_cache), and then we compute.
        return split.map(function, desc=desc, new_fingerprint=f"{key}-{name}", load_from_cache_file=False,
                         **map_kwargs)

    if isinstance(dataset, DatasetDict):
        result = DatasetDict({name: map_split(split, name) for name, split in dataset.items()})
    else:
        result = map_split(dataset, "all")
    tmp = f"{path}.tmp{os.getpid()}"
    result.save_to_disk(tmp)
    if os.path.isdir(path):  # overwrite_cache, or an unreadable copy: replace it
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)  # atomic: concurrent sweep trials never see a half-written cache
    except OSError:  # another process got there first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Saved tokenized data to cache %s", path)
    return load_from_disk(path)


def train_wordpiece_tokenizer(text_iterator, vocab_size, model_max_length, output_dir=None, lowercase=True):
    """Train a BERT-style WordPiece tokenizer (with [CLS]/[SEP]/[MASK]) on the training text.

    Used for from-scratch runs that name no tokenizer, so nothing has to be downloaded.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(text_iterator, trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length,
    )
    if output_dir:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def batched_texts(dataset, column, batch_size=1000):
    """Yield lists of non-empty texts from a (streaming or not) dataset column, for tokenizer training."""
    batch = []
    for example in dataset:
        text = example[column]
        if text and text.strip():
            batch.append(text)
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


class BatchSeeds:
    """One seed per batch, derived from (seed, process rank, batch number), for the collators' masking.

    Drawing masks from the global RNG would tie them to everything else that consumes it; and the
    Trainer collates the first batch after a resume before it restores the checkpoint's RNG state.
    With a seed per batch number, a resumed run draws exactly the masks the uninterrupted run drew.
    `start` is the number of batches consumed before the current DataLoader iterator began (set by
    train_utils at each epoch start); DataLoader workers take batches round-robin, hence the stride.
    """

    def __init__(self, seed):
        self.seed, self.start, self._local = seed, 0, 0

    def restart(self, start):
        self.start, self._local = start, 0

    def next(self):
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        index = self.start + worker_id + workers * self._local
        self._local += 1
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        return [self.seed, rank, index]


class FastMLMCollator(DataCollatorForLanguageModeling):
    """DataCollatorForLanguageModeling that (a) finds special tokens with one vectorized `isin` per batch
    instead of a Python call per row, so no special_tokens_mask column is stored, and (b) masks with a
    per-batch seed (BatchSeeds), so resumed runs are exact."""

    def __init__(self, *args, seed=42, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_seeds = BatchSeeds(seed)

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
        if special_tokens_mask is None:
            special_ids = torch.tensor(self.tokenizer.all_special_ids, dtype=inputs.dtype)
            special_tokens_mask = torch.isin(inputs, special_ids)
        seed = int(np.random.SeedSequence(self.batch_seeds.next()).generate_state(1)[0])
        self.generator = torch.Generator().manual_seed(seed)
        return super().torch_mask_tokens(inputs, special_tokens_mask=special_tokens_mask, offset_mapping=offset_mapping)


# === T5 span corruption (compute_t5_input_and_target_lengths, DataCollatorForT5SpanCorruption) ===

# Imports only this section needs (numpy and torch come from the top of the file); kept here so the
# section can be edited without touching the shared header.
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _t5_noise_counts(raw_length, noise_density, mean_noise_span_length):
    """(noise tokens, noise spans) that T5 span corruption uses for a chunk of `raw_length` tokens."""
    num_noise = int(round(raw_length * noise_density))
    # Keep at least one token on each side: with no noise there is nothing to predict, with no kept token
    # there is no context.
    num_noise = min(max(num_noise, 1), raw_length - 1)
    # Spans alternate kept / noise, so there cannot be more spans than tokens of the scarcer kind.
    num_nonnoise = raw_length - num_noise
    num_spans = max(1, int(round(min(num_noise, num_nonnoise) / mean_noise_span_length)))
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
