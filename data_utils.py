"""Data utilities that run_mlm.py, run_span_t5.py and fine_tune_glue.py share: raw text from the Hub, local files
or the embedded offline corpus; the tokenized-data cache; the tokenizer a from-scratch run trains once per
corpus; per-batch seeds for the collators' masks. Fast tokenizing and packing are in packing.py.
"""

import contextlib
import glob
import hashlib
import inspect
import itertools
import logging
import os
import shutil

import torch
from datasets import DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk
from transformers import AutoConfig, AutoTokenizer

from arguments import UserError, file_format

logger = logging.getLogger(__name__)

# Local file extension -> `datasets` builder name (and its options).
FILE_BUILDERS = {"txt": ("text", {}), "text": ("text", {}), "raw": ("text", {}),  # WikiText ships plain text as .raw
                 "csv": ("csv", {}), "tsv": ("csv", {"sep": "\t", "quoting": 3}),  # 3 = csv.QUOTE_NONE: bare quotes
                 "json": ("json", {}), "jsonl": ("json", {}), "parquet": ("parquet", {})}


def cache_root(cache_dir=None):
    """Our own cache folder (embedded corpus, tokenized data), beside the `datasets` cache by default."""
    if cache_dir:
        return os.path.abspath(cache_dir)
    hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.environ.get("HF_SCRIPTS_CACHE", os.path.join(hf_home, "training_scripts"))


def write_embedded_corpus(cache_dir=None, validation_every=20):
    """The documentation text inside every Python interpreter (`pydoc_data.topics`) as train/validation .txt
    files, one paragraph a line, every `validation_every`-th held out: an offline corpus on a fresh machine."""
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
    if not path.endswith((".parquet", ".gz", ".zst")):
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as err:
            if err.start < len(head) - 4:  # not just a multi-byte character cut at the end of the sample
                raise UserError(f"{flag} {path!r} is not UTF-8 text (bad byte at offset {err.start}); "
                                "convert it, e.g. iconv -f latin1 -t utf-8")


def find_shards(spec, flag):
    """A file, a folder (its data files, in name order) or a glob pattern -> the data file paths, sorted."""
    if any(c in spec for c in "*?["):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(spec):
        paths = sorted(p for p in (os.path.join(spec, n) for n in os.listdir(spec)) if os.path.isfile(p))
    else:
        return [spec]
    paths = [p for p in paths if file_format(p) in FILE_BUILDERS]
    if not paths:
        what = "is a folder that holds" if os.path.isdir(spec) else "matches"
        raise UserError(f"{flag} {spec!r} {what} no data files; give .txt, .jsonl or .parquet files (.gz/.zst too)")
    return paths


def load_data_file(spec, flag, cache_dir=None, streaming=False):
    """Local data (a file, or a folder or glob of files of one format: find_shards) as one dataset; a bad file
    raises UserError."""
    paths = find_shards(spec, flag)
    check_data_file(paths[0], flag)  # the first file stands for the rest: one format
    extension = file_format(paths[0])
    builder, options = FILE_BUILDERS[extension]
    if builder == "text":
        options = {**options, "keep_linebreaks": False}
    try:
        return load_dataset(builder, data_files={"data": paths}, split="data", cache_dir=cache_dir,
                            streaming=streaming, **options)
    except Exception as err:  # a parse error of a user's file: name the file and the reason
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(f"{flag} {spec!r} could not be read as {extension}: {reason}") from err


def load_raw_datasets(model_args, data_args):
    """Raw 'train' and 'validation' splits from the Hub, local files or the embedded corpus. Without validation
    data the first `validation_split_percentage` percent of train is held out, as the HF examples do (from a
    stream, packing.hold_out_from_stream holds out blocks after packing)."""
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
            raw["train"] = load_data_file(train_file, "--train_file", model_args.cache_dir, streaming)
        if validation_file:
            raw["validation"] = load_data_file(validation_file, "--validation_file", model_args.cache_dir, streaming)
        raw = (IterableDatasetDict if streaming else DatasetDict)(raw)
    held_out = "validation" not in raw and "train" in raw and data_args.validation_split_percentage > 0
    if held_out and not streaming:  # a stream has no length to take a share of: see packing.hold_out_from_stream
        train = raw["train"]
        if len(train) < 2:
            raise UserError(f"the training data has {len(train)} example(s), too few to hold out a validation "
                            "share; pass --validation_file (or more training text)")
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


def tokenizer_fingerprint(tokenizer):
    """A stable hash of what a tokenizer does, for the tokenized-data cache key."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__name__, str(tokenizer.special_tokens_map), str(len(tokenizer))]
    parts.append(backend.to_str() if backend is not None else str(sorted(tokenizer.get_vocab().items())))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def cached_map(dataset, function, key_parts, cache_dir=None, overwrite=False, desc="Tokenizing", **map_kwargs):
    """`dataset.map(function, ...)`, saved under a key of the input's fingerprint, `key_parts` and the function's
    source: the next run on the same data, tokenizer, settings and code (a sweep's next trial) loads it
    memory-mapped; an edited preprocessing function is run again. Streams map lazily."""
    if isinstance(dataset, (IterableDataset, IterableDatasetDict)):
        map_kwargs.pop("num_proc", None)
        return dataset.map(function, **map_kwargs)
    fingerprints = {k: d._fingerprint for k, d in dataset.items()} if isinstance(dataset, DatasetDict) else dataset._fingerprint
    try:
        code = inspect.getsource(function)
    except (OSError, TypeError):  # no source file (an interactive session): the compiled code
        code = getattr(getattr(function, "__code__", None), "co_code", b"")
    key = hashlib.sha256(repr((fingerprints, key_parts, code)).encode()).hexdigest()[:20]
    path = os.path.join(cache_root(cache_dir), "tokenized", key)
    if os.path.isdir(path) and not overwrite:
        try:
            loaded = load_from_disk(path)
            logger.info("Loaded tokenized data from cache %s", path)
            return loaded
        except Exception as err:  # a half-written or foreign folder: rebuild it
            logger.warning("Ignoring unreadable tokenized-data cache %s (%s)", path, err)

    def map_split(split, name):
        # Naming the fingerprint spares datasets from pickling `function` (the tokenizer with its vocabulary) to
        # hash it; as that name misses edits to `function`, datasets' own cache file is never reused.
        return split.map(function, desc=desc, new_fingerprint=f"{key}-{name}", load_from_cache_file=False,
                         **map_kwargs)

    if isinstance(dataset, DatasetDict):
        result = DatasetDict({name: map_split(split, name) for name, split in dataset.items()})
    else:
        result = map_split(dataset, "all")
    if any(len(split) == 0 for split in (result.values() if isinstance(result, DatasetDict) else [result])):
        return result  # datasets cannot load a saved empty split; the script says what is too short
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


def take_at_most(dataset, count):
    """The first `count` examples of a dataset or a stream (all of them when count is None)."""
    if dataset is None or not count:
        return dataset
    if isinstance(dataset, list):
        return dataset[:count]
    if isinstance(dataset, IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


def data_identity(model_args, data_args):
    """What identifies the training text: each local file's path, size and modification time, or the Hub
    dataset's name, config and split; with the share held out for validation and whether it streams."""
    if data_args.dataset_name:
        sources = [data_args.dataset_name, data_args.dataset_config_name, "train"]
    else:
        files = find_shards(data_args.train_file, "--train_file") if data_args.train_file else \
            write_embedded_corpus(model_args.cache_dir)[:1]
        sources = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]
    held_out = data_args.validation_file is None and data_args.validation_split_percentage
    return repr((sources, held_out, data_args.streaming))


def load_pretrained_config(source, model_args):
    """AutoConfig.from_pretrained(source) with the run's Hub settings; a folder without a model, or a Hub id that
    cannot be reached, is a UserError naming the fix."""
    try:
        return AutoConfig.from_pretrained(source, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                                          token=model_args.token, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as err:  # a folder without a model, a Hub id offline or misspelled
        raise UserError(f"no model config at {source!r} ({str(err).strip().splitlines()[0][:150]}); give a model's "
                        "folder (with config.json) or a Hub id") from None


def load_or_train_tokenizer(model_args, data_args, output_dir, train_split, text_column, kind, train):
    """The tokenizer named by --tokenizer_name (else the model's). A from-scratch run without one takes the
    copy saved in output_dir (a resumed run), else the one trained earlier on the same data (data_identity)
    with the same `kind` (e.g. "wordpiece8192"), else calls `train(batches_of_texts, save_to)` now."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        return AutoTokenizer.from_pretrained(
            name, cache_dir=model_args.cache_dir, use_fast=model_args.use_fast_tokenizer,
            revision=model_args.model_revision, token=model_args.token, trust_remote_code=model_args.trust_remote_code,
        )
    if train_split is None:
        raise UserError("no training text to train a tokenizer on; pass --tokenizer_name (or a model's folder)")
    key = hashlib.sha256(data_identity(model_args, data_args).encode()).hexdigest()[:16]
    cached = os.path.join(cache_root(model_args.cache_dir), "tokenizers", f"{kind}-{key}")
    for folder in (output_dir, cached):
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            logger.info("Loaded the tokenizer trained earlier from %s", folder)
            return AutoTokenizer.from_pretrained(folder)
    texts = batched_texts(train_split.take(200_000) if data_args.streaming else train_split, text_column)
    tokenizer = train(texts, cached)
    logger.info("Trained a tokenizer (%s, %d ids) on the training text; saved to %s", kind, len(tokenizer), cached)
    return tokenizer


def batched_texts(dataset, column, batch_size=1000):
    """Lists of non-blank texts from a dataset column (streamed or not), for tokenizer training."""
    texts = (text for text in (example[column] for example in dataset) if text and text.strip())
    while batch := list(itertools.islice(texts, batch_size)):
        yield batch


class BatchSeeds:
    """One seed per batch from (seed, process rank, batch number), for the collators' masks: a resumed run
    draws the masks the uninterrupted run drew (the Trainer collates the first batch after a resume before it
    restores the RNG state). `start`: batches consumed before this DataLoader iterator began (set at each
    epoch start by train_utils.BatchSeedCallback); workers take batches round-robin, hence the stride.
    Inside `evaluation()` batches take a stream of their own, from its start each time."""

    def __init__(self, seed):
        self.seed, self.start, self._local, self._evaluating = seed, 0, 0, False

    def restart(self, start):
        self.start, self._local = start, 0

    @contextlib.contextmanager
    def evaluation(self):
        """Eval masks that depend only on the eval data and the seed; the training stream resumes as it was."""
        saved = self.start, self._local, self._evaluating
        self.start, self._local, self._evaluating = 0, 0, True
        try:
            yield
        finally:
            self.start, self._local, self._evaluating = saved

    def next(self):
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        index = self.start + worker_id + workers * self._local
        self._local += 1
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        return [self.seed, rank, index, 1] if self._evaluating else [self.seed, rank, index]

