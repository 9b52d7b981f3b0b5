"""Training blocks streamed from a sharded corpus, for run_mlm.py and run_span_t5.py with --streaming: read,
tokenized and packed on the fly in each process's own DataLoader workers, and resumable in constant time.

How the order is made (so that it depends on the seed and --stream_lanes only, never on how many processes or
workers read it): the shards are dealt to `lanes` independent streams, a new seeded deal each epoch; each lane
reads its shards batch by batch (10,000 rows, as the in-memory path maps them, so the same text gives the same
blocks) and shuffles each window of --shuffle_buffer_size consecutive blocks with a seed of its own. The global
order takes one block from each lane in turn. Reader r of R (process rank x workers + worker) serves lanes r,
r+R, ..., so it delivers global blocks r, r+R, r+2R, ...: the R readers together deliver the first n blocks with
no block twice, as one reader would. A lane's position (where its current window starts, how many blocks of it
were trained on) travels with each batch; the Trainer saves the positions of the batches it trained on in every
checkpoint, and a resumed run re-reads one window per lane instead of every batch before it.
"""

import io
import itertools
import json
import multiprocessing
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

import data_utils
import train_utils
from arguments import UserError, file_format

SHARD_FORMATS = ("txt", "raw", "text", "json", "jsonl", "parquet")  # .gz/.zst compressed too, except parquet
POSITIONS_FILE = "stream_positions.json"
POSITION_KEY = "stream_position"  # the batch key that carries lane positions from the workers to the Trainer


def hub_shards(dataset_name, config_name=None, token=None):
    """The data files of a Hub dataset's train split (hf:// paths), for streaming them as shards."""
    from datasets import load_dataset_builder

    builder = load_dataset_builder(dataset_name, config_name, token=token)
    files = (builder.config.data_files or {}).get("train")
    files = [str(f) for f in files or [] if file_format(str(f)) in SHARD_FORMATS]
    if not files:
        raise UserError(f"--dataset_name {dataset_name!r} has no .parquet, .jsonl or .txt files in its train split "
                        "to stream as shards; download it and pass --train_file")
    return files


def load_training_stream(model_args, data_args, training_args, column, make_blocks, resume_from, hold_out):
    """The training stream of a run with --streaming (ShardedBlocks over --train_file's shards or the Hub
    dataset's files), put where `resume_from` stopped. With `hold_out` (no validation data) the first
    --max_eval_samples blocks (1000 unless set) of the first shard are the validation split, never trained on.
    Returns (stream, those blocks or None)."""
    if data_args.max_train_samples:
        raise UserError("--max_train_samples does not apply to --streaming; bound the run with --max_steps")
    if data_args.dataset_name:
        shards = hub_shards(data_args.dataset_name, data_args.dataset_config_name, model_args.token)
    else:
        shards = data_utils.find_shards(data_args.train_file or data_utils.write_embedded_corpus(model_args.cache_dir)[0],
                                        "--train_file")
    unfit = [path for path in shards if file_format(path) not in SHARD_FORMATS]
    if unfit:
        raise UserError(f"--streaming reads .txt, .jsonl (.gz, .zst) and .parquet shards, not {unfit[0]!r}; "
                        "convert it or leave out --streaming")
    readers = training_args.world_size * max(1, training_args.dataloader_num_workers)
    lanes = data_args.stream_lanes or readers
    if lanes % readers:
        raise UserError(f"--stream_lanes {lanes} must be a multiple of processes x dataloader workers ({readers})")
    hold = hold_out and data_args.validation_split_percentage > 0
    stream = ShardedBlocks(shards, column, make_blocks, training_args.seed, lanes, data_args.shuffle_buffer_size,
                           held_out=(data_args.max_eval_samples or 1000) if hold else 0)
    resume_stream(stream, resume_from, training_args.ignore_data_skip)
    return stream, stream.held_out_blocks() if hold else None


def _rows(path, column, offset, skip):
    """((offset, index), text) for each row of a shard from row `skip` of the line (or parquet row) at
    `offset`. Text files: one row a line (lines end as datasets' text loader ends them);
    JSON lines: the `column` of each object; parquet: offset is the row number."""
    if path.lower().endswith(".parquet"):
        with fsspec.open(path, "rb").open() as f:
            parquet = pq.ParquetFile(f)
            first, group = 0, 0
            while group < parquet.num_row_groups and first + parquet.metadata.row_group(group).num_rows <= offset:
                first += parquet.metadata.row_group(group).num_rows
                group += 1
            for batch in parquet.iter_batches(10_000, row_groups=range(group, parquet.num_row_groups), columns=[column]):
                for text in batch.column(0).to_pylist():
                    if first >= offset:
                        yield (first, 0), text
                    first += 1
        return
    is_json = ".json" in path.lower()
    with fsspec.open(path, "rb", compression="infer").open() as f:
        f.seek(offset)  # compressed shards are decompressed up to it: bounded by the shard, not by the run
        lines = io.BufferedReader(f) if path.lower().endswith(".zst") else f  # zstandard's reader has no readline
        for line in lines:
            if is_json:
                try:
                    texts = [json.loads(line).get(column)] if line.strip() else []
                except (ValueError, AttributeError) as err:
                    raise ValueError(f"{path}: the line at byte {offset} is not a JSON object ({err})") from None
            else:  # universal newlines, as datasets reads text: \n, \r\n and \r end a line
                texts = line.decode("utf-8").removesuffix("\n").removesuffix("\r").split("\r")
            for index in range(skip, len(texts)):
                yield (offset, index), texts[index]
            offset, skip = offset + len(line), 0


def _examples(table):
    """A pyarrow Table of blocks -> one dict per row; fixed-length columns as numpy rows (one stack per batch in
    the collator), others as lists."""
    columns = {}
    for name in table.column_names:
        column = table[name].combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            shape = []
            while pa.types.is_fixed_size_list(column.type):
                shape.append(column.type.list_size)
                column = column.flatten()
            columns[name] = column.to_numpy(zero_copy_only=False).reshape(len(table), *shape)
        else:
            columns[name] = column.to_pylist()
    return [{name: values[i] for name, values in columns.items()} for i in range(len(table))]


class ShardedBlocks(torch.utils.data.IterableDataset):
    """An endless stream of training blocks from `shards` (module docstring). `make_blocks(table)` turns a
    pyarrow Table of raw rows (column `column`) into a Table of blocks: the script's own preprocessing. The first
    `held_out` blocks of shards[0] are the validation split and are never trained on."""

    def __init__(self, shards, column, make_blocks, seed, lanes, shuffle_buffer_size=1000, held_out=0,
                 rows_per_batch=10_000):
        if lanes > len(shards):
            raise UserError(f"{len(shards)} shard(s) cannot feed {lanes} lanes (--stream_lanes, by default processes x "
                            "dataloader workers); split the corpus into more files or use fewer lanes")
        self.shards, self.column, self.make_blocks, self.seed, self.lanes = shards, column, make_blocks, seed, lanes
        self.window, self.held_out, self.rows_per_batch = max(1, shuffle_buffer_size), held_out, rows_per_batch
        self.rank, self.world = 0, 1  # set by the Trainer in each process
        self.batches = 0  # batches this process trained on (counted by record; a resumed run starts with them)
        self.positions = {}  # lane -> its state after the last block trained on (set in the main process)

    def held_out_blocks(self):
        """The first `held_out` blocks of shards[0], in order: the validation split."""
        blocks = (example for _, table in self._batches(0, 0, 0) for example in _examples(table))
        return list(itertools.islice(blocks, self.held_out))

    def lane_shards(self, lane, epoch):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [int(i) for i in order[lane :: self.lanes]]

    def _batches(self, shard, offset, skip):
        rows = _rows(self.shards[shard], self.column, offset, skip)
        while batch := list(itertools.islice(rows, self.rows_per_batch)):
            yield batch[0][0], self.make_blocks(pa.table({self.column: [text or "" for _, text in batch]}))

    def _blocks(self, lane, cursor):
        """(block, cursor after it) in the lane's order before shuffling; a cursor is (epoch, k: the lane's k-th
        shard that epoch, offset and row of the batch's first row, blocks of that batch taken, blocks of the shard
        before the batch)."""
        epoch, k, offset, row, skip, before = cursor
        while True:
            found, whole_epoch = False, k == 0
            shards = self.lane_shards(lane, epoch)
            for k in range(k, len(shards)):
                for (offset, row), table in self._batches(shards[k], offset, row):
                    examples = _examples(table)
                    for b in range(skip, len(examples)):
                        if shards[k] != 0 or before + b >= self.held_out:
                            found = True
                            yield examples[b], (epoch, k, offset, row, b + 1, before)
                    before, skip = before + len(examples), 0
                offset, row, before = 0, 0, 0
            if whole_epoch and not found:  # less than one block in a whole epoch: the stream ends (require_blocks)
                return
            epoch, k = epoch + 1, 0

    def _lane(self, lane, state):
        """(block, lane state after it): windows of `window` blocks, each shuffled with its own seed. The state
        (cursor at the window's start, window number, blocks of it taken, blocks so far) re-reads one window."""
        cursor, window, taken, count = state or ((0, 0, 0, 0, 0, 0), 0, 0, 0)
        blocks = self._blocks(lane, tuple(cursor))
        while True:
            chunk = list(itertools.islice(blocks, self.window))
            if not chunk:
                return
            order = np.random.default_rng([self.seed, lane, window]).permutation(len(chunk))
            after = chunk[-1][1]
            for j in range(taken, len(chunk)):
                count += 1
                state = (cursor, window, j + 1, count) if j + 1 < len(chunk) else (after, window + 1, 0, count)
                yield chunk[order[j]][0], state
            cursor, window, taken = after, window + 1, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        readers = self.world * workers
        if self.lanes % readers:
            raise ValueError(f"{self.lanes} lanes cannot be split among {readers} readers (processes x workers)")
        # After a resume at batch B, this process's worker w delivers what worker (w + B) % workers delivered.
        reader = self.rank * workers + (worker + self.batches) % workers
        lanes = list(range(reader, self.lanes, readers))
        streams = {lane: self._lane(lane, self.positions.get(lane)) for lane in lanes}
        # Lanes take turns; after a resume the turn is the first lane with the fewest blocks given.
        counts = [self.positions[lane][3] if lane in self.positions else 0 for lane in lanes]
        turn = counts.index(min(counts))
        for lane in itertools.cycle(lanes[turn:] + lanes[:turn]):
            example, state = next(streams[lane], (None, None))
            if example is None:
                return
            yield {**example, POSITION_KEY: (lane, state)}

    # The main process's record of what was trained on, saved in checkpoints and read back on resume.
    def record(self, positions):
        """A batch was trained on; `positions`: its last (lane, state) of each lane."""
        self.batches += 1
        for lane, state in positions:
            if state[3] > self.positions.get(lane, (None, 0, 0, 0))[3]:
                self.positions[lane] = state

    def state_dict(self):
        return {"lanes": self.lanes, "seed": self.seed, "shards": len(self.shards), "window": self.window,
                "batches": self.batches, "positions": {str(lane): state for lane, state in sorted(self.positions.items())}}

    def load_state_dict(self, state, where):
        saved = (state["lanes"], state["seed"], state["shards"], state["window"])
        if saved != (self.lanes, self.seed, len(self.shards), self.window):
            raise UserError(f"{where} was saved with {state['lanes']} lanes, seed {state['seed']}, {state['shards']} "
                            f"shards and --shuffle_buffer_size {state['window']}, this run has {self.lanes}, {self.seed}, "
                            f"{len(self.shards)} and {self.window}; use the same (--stream_lanes {state['lanes']}) or "
                            "pass --ignore_data_skip to restart the stream")
        self.positions = {int(lane): (tuple(s[0]), *s[1:]) for lane, s in state["positions"].items()}
        self.batches = state["batches"]


class CollateWithPositions:
    """The collator, with the examples' lane positions kept aside as the batch's last position of each lane."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        positions = dict(example.pop(POSITION_KEY) for example in examples)
        batch = self.collator(examples)
        batch[POSITION_KEY] = sorted(positions.items())
        return batch


class ResumableStreamTrainer(train_utils.IsolatedEvalTrainer):
    """IsolatedEvalTrainer for a ShardedBlocks training stream: each process reads its own lanes in its own
    DataLoader (accelerate would otherwise read everything on rank 0 and dispatch it, or read everything in
    every process and keep a slice); the positions of the batches trained on go into each checkpoint; a resumed
    run restarts the stream there instead of reading and dropping the batches before it."""

    def get_train_dataloader(self):
        stream, args = self.train_dataset, self.args
        if not isinstance(stream, ShardedBlocks):
            return super().get_train_dataloader()
        stream.rank, stream.world = args.process_index, args.world_size
        collator = CollateWithPositions(self._get_collator_with_removed_columns(self.data_collator, "training"))
        context = args.dataloader_multiprocessing_context
        if args.dataloader_num_workers and context is None and "fork" in multiprocessing.get_all_start_methods():
            context = "fork"  # the stream holds the script's preprocessing function, which spawn cannot pickle
        loader = DataLoader(stream, batch_size=self._train_batch_size, collate_fn=collator,
                            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                            prefetch_factor=args.dataloader_prefetch_factor, multiprocessing_context=context)
        return prepare_data_loader(loader, args.device, num_processes=1, process_index=0, put_on_device=True,
                                   dispatch_batches=False)

    def get_resumed_dataloader(self, dataloader, num_batches):
        if isinstance(self.train_dataset, ShardedBlocks):
            return dataloader  # the stream starts where the checkpoint's positions say (resume_stream)
        return super().get_resumed_dataloader(dataloader, num_batches)

    def training_step(self, model, inputs, *args, **kwargs):
        positions = inputs.pop(POSITION_KEY, None)
        if positions is not None:
            self.train_dataset.record(positions)
        return super().training_step(model, inputs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's files, so a checkpoint that looks complete (trainer_state.json) has it.
        if isinstance(self.train_dataset, ShardedBlocks):
            state = self.train_dataset.state_dict()
            if self.args.world_size > 1:
                gathered = [None] * self.args.world_size
                torch.distributed.all_gather_object(gathered, state["positions"])
                state["positions"] = {k: v for part in gathered for k, v in part.items()}
            if self.args.should_save:
                folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, POSITIONS_FILE), "w", encoding="utf-8") as f:
                    json.dump(state, f)
        return super()._save_checkpoint(model, trial)


def resume_stream(stream, checkpoint, ignore_data_skip=False):
    """Put a ShardedBlocks stream where `checkpoint`'s run stopped (nothing to do with --ignore_data_skip)."""
    if checkpoint is None or ignore_data_skip:
        return
    path = os.path.join(checkpoint, POSITIONS_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{checkpoint} holds no stream position ({POSITIONS_FILE}): it was saved by a run that did "
                        "not stream shards; pass --ignore_data_skip to start the stream from its beginning")
    with open(path, encoding="utf-8") as f:
        stream.load_state_dict(json.load(f), checkpoint)
