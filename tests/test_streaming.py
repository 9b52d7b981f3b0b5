"""Streamed sharded corpora (streaming.py): the rows of every shard format are the rows datasets reads, a stream
packs the same blocks as the in-memory path, and a run stopped by a signal resumes with exactly the batches the
uninterrupted run trained on, without reading the ones before (the 200 MB acceptance runs are in
benchmarks/streamed_corpus.py and test_streaming_corpus.py)."""

import gzip
import json
import os
import random
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from datasets import load_dataset

import run_mlm
import run_span_t5
import streaming
import train_utils
from arguments import UserError
from conftest import SENTENCES, TINY_BERT
from test_reliability import interrupt
from test_run_span_t5 import TINY_T5

TRICKY = ["first line", "", "  ", "crlf line\r", "unicode \u00e9\u4e2d", "sep\u2028inside", "last"]


def write_shards(folder, count=4, lines_per_shard=120, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        lines = [f"{rng.choice(SENTENCES)} shard {i} line {j} {rng.randrange(10**6)}" for j in range(lines_per_shard)]
        (folder / f"part-{i:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def rows_of(path, column="text", rows_per_batch=3):
    stream = streaming.ShardedBlocks([str(path)], column, lambda table: table, seed=0, lanes=1, shuffle_buffer_size=1,
                                     rows_per_batch=rows_per_batch)
    return [text for _, table in stream._batches(0, 0, 0) for text in table[column].to_pylist()]


def test_every_shard_format_gives_the_rows_datasets_reads(tmp_path):
    text = "\n".join(TRICKY).replace("\r\n", "\r\n")
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    objects = [{"text": line, "n": i} for i, line in enumerate(TRICKY)]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(o) + "\n" for o in objects)
    with zstandard.open(tmp_path / "e.jsonl.zst", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(o) + "\n" for o in objects)
    pq.write_table(pa.table({"text": TRICKY}), tmp_path / "d.parquet", row_group_size=2)
    for name, builder in (("a.txt", "text"), ("b.jsonl", "json"), ("c.jsonl.gz", "json"), ("e.jsonl.zst", "json"),
                          ("d.parquet", "parquet")):
        options = {"keep_linebreaks": False} if builder == "text" else {}
        expected = load_dataset(builder, data_files=str(tmp_path / name), split="train", cache_dir=str(tmp_path / "hf"),
                                **options)["text"]
        assert rows_of(tmp_path / name) == expected, name


@pytest.mark.parametrize("name", ["a.txt", "b.jsonl.gz", "b.jsonl.zst", "c.parquet"])
def test_a_shard_read_from_any_saved_position_continues_with_the_same_rows(tmp_path, name):
    lines = [f"row {i} " + "x" * (i % 7) for i in range(50)]
    if name.endswith(".txt"):
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif name.endswith((".gz", ".zst")):
        with (gzip if name.endswith(".gz") else zstandard).open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": line}) + "\n" for line in lines)
    else:
        pq.write_table(pa.table({"text": lines}), tmp_path / name, row_group_size=8)
    rows = list(streaming._rows(str(tmp_path / name), "text", 0, 0))
    assert [text for _, text in rows] == lines
    for i in (0, 1, 17, 49):
        (offset, skip), _ = rows[i]
        assert [text for _, text in streaming._rows(str(tmp_path / name), "text", offset, skip)] == lines[i:]


def blocks_of(stream, count):
    return [example["input_ids"].tolist() for example in
            (dict(e) for e, _ in zip(stream, range(count)))]


def pack(table):
    """One block per line, naming it: (shard, line), so a block seen twice is a line read twice."""
    ids = [[int(text.split(" shard ")[1].split()[0]), int(text.split(" line ")[1].split()[0])]
           for text in table["text"].to_pylist()]
    return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(sum(ids, []), pa.int32()), 2)})


def test_readers_together_deliver_the_blocks_one_reader_delivers_and_a_stream_resumes_from_positions(
        tmp_path, monkeypatch):
    shards = [str(p) for p in sorted(write_shards(tmp_path / "c", count=4).iterdir())]
    one = streaming.ShardedBlocks(shards, "text", pack, seed=3, lanes=4, shuffle_buffer_size=16, rows_per_batch=25)
    reference = blocks_of(one, 400)
    assert len({tuple(b) for b in reference}) == len(reference)  # nothing twice within the epoch
    # Four readers (2 processes x 2 workers): reader r delivers global blocks r, r + 4, ...
    for reader in range(4):
        part = streaming.ShardedBlocks(shards, "text", pack, seed=3, lanes=4, shuffle_buffer_size=16, rows_per_batch=25)
        part.rank, part.world = reader, 4
        assert blocks_of(part, 100) == reference[reader::4]
    # Positions recorded after 150 blocks put a new stream at block 150, whatever it has read.
    first = streaming.ShardedBlocks(shards, "text", pack, seed=3, lanes=4, shuffle_buffer_size=16, rows_per_batch=25)
    for example in (e for e, _ in zip(first, range(150))):
        first.record([example[streaming.POSITION_KEY]])
    resumed = streaming.ShardedBlocks(shards, "text", pack, seed=3, lanes=4, shuffle_buffer_size=16, rows_per_batch=25)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())), "checkpoint")
    rows_read = []
    original = streaming._rows
    monkeypatch.setattr(streaming, "_rows", lambda *a: (rows_read.append(1) or row for row in original(*a)))
    assert blocks_of(resumed, 250) == reference[150:]
    # It re-read at most one batch (25 rows) a lane, not the 150 blocks before.
    rows_resumed = len(rows_read)
    rows_read.clear()
    blocks_of(streaming.ShardedBlocks(shards, "text", pack, seed=3, lanes=4, shuffle_buffer_size=16, rows_per_batch=25), 400)
    print(f"rows read for blocks 150-399: {rows_resumed} resumed, {len(rows_read)} from the start")
    assert rows_resumed <= len(rows_read) - 150 + 4 * 25
    with pytest.raises(UserError, match="--stream_lanes 4"):
        streaming.ShardedBlocks(shards, "text", pack, seed=3, lanes=2).load_state_dict(first.state_dict(), "c")


def record_batches(monkeypatch):
    """Every training batch's token ids and labels, as the Trainer passes them to the model."""
    seen = []
    original = train_utils.IsolatedEvalTrainer.training_step  # what ResumableStreamTrainer's calls

    def training_step(self, model, inputs, *args, **kwargs):
        seen.append((self.state.global_step, inputs["input_ids"].tolist(), inputs["labels"].tolist()))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(train_utils.IsolatedEvalTrainer, "training_step", training_step)
    return seen


def unmasked(batches):
    """The text blocks of recorded batches: masked positions restored from the labels."""
    return [tuple(label if label != -100 else token for token, label in zip(row, row_labels))
            for _, ids, labels in batches for row, row_labels in zip(ids, labels)]


@pytest.mark.parametrize("script,workers", [("run_mlm", 0), ("run_span_t5", 0), ("run_mlm", 2)])
def test_a_streamed_run_stopped_by_sigterm_resumes_with_the_uninterrupted_batches(tmp_path, monkeypatch, script, workers):
    """Stopped after an odd number of batches, so that with 2 workers the resumed run's first worker delivers
    what the second one would have."""
    shards = write_shards(tmp_path / "corpus", count=4)
    main = run_mlm.main if script == "run_mlm" else run_span_t5.main

    def args(name):
        return [*(TINY_BERT if script == "run_mlm" else TINY_T5), f"--output_dir={tmp_path / name}", "--streaming",
                f"--train_file={shards}", "--max_steps=10", "--save_steps=100", "--seed=5", "--do_train",
                "--shuffle_buffer_size=20", "--stream_lanes=2", "--max_eval_samples=8", f"--dataloader_num_workers={workers}"]

    seen = record_batches(monkeypatch)
    main(args("straight"))
    straight = {step: batch for step, *batch in seen}
    assert sorted(straight) == list(range(10))
    seen.clear()
    interrupt(main, args("cut"), 4, signal.SIGTERM, monkeypatch)
    assert (tmp_path / "cut" / "checkpoint-5" / streaming.POSITIONS_FILE).is_file()
    assert {step: batch for step, *batch in seen} == {s: straight[s] for s in range(5)}
    seen.clear()
    main(args("cut"))
    resumed = {step: batch for step, *batch in seen}
    assert sorted(resumed) == [5, 6, 7, 8, 9]
    assert resumed == {s: straight[s] for s in range(5, 10)}  # token ids and labels (masks) alike


def test_ignore_data_skip_restarts_the_stream_from_its_beginning(tmp_path, monkeypatch):
    shards = write_shards(tmp_path / "corpus", count=2)
    args = [*TINY_BERT, f"--output_dir={tmp_path / 'run'}", "--streaming", f"--train_file={shards}", "--do_train",
            "--max_steps=6", "--save_steps=100", "--seed=5", "--stream_lanes=1", "--max_eval_samples=8"]
    seen = record_batches(monkeypatch)
    interrupt(run_mlm.main, args, 2, signal.SIGTERM, monkeypatch)  # checkpoint-3
    first = unmasked(seen)
    seen.clear()
    run_mlm.main([*args, "--ignore_data_skip"])  # the weights resume at step 3, the data from the start
    assert [step for step, *_ in seen] == [3, 4, 5] and unmasked(seen) == first


def test_a_shard_streamed_gives_the_blocks_the_in_memory_path_gives(tmp_path):
    """run_mlm.py's packing over a 25,000-line file (three batches of 10,000 rows, each dropping its own tail):
    the stream, unshuffled, yields the blocks datasets' batched map makes, in the same order."""
    import packing

    lines = [f"{SENTENCES[i % len(SENTENCES)]} {i}" if i % 9 else "" for i in range(25_000)]
    (tmp_path / "one.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = run_mlm.train_wordpiece_tokenizer([lines[:2000]], 300, 128)
    encode = packing.TokenIds(tokenizer)

    def tokenize(batch):  # as run_mlm.py's, packed into blocks of 32
        return packing.pack_token_ids(encode(packing.non_blank(batch["text"])), 32)

    raw = load_dataset("text", data_files=str(tmp_path / "one.txt"), split="train", cache_dir=str(tmp_path / "hf"))
    in_memory = raw.with_format("arrow").map(tokenize, batched=True, batch_size=10_000, remove_columns=["text"])
    stream = streaming.ShardedBlocks([str(tmp_path / "one.txt")], "text", tokenize, seed=0, lanes=1, shuffle_buffer_size=1)
    assert len(in_memory) > 1000
    assert blocks_of(stream, len(in_memory)) == in_memory.with_format(None)["input_ids"]


def test_a_hub_style_dataset_folder_streams_its_train_files(tmp_path):
    """--dataset_name with --streaming streams the dataset's data files as shards (here a local dataset folder;
    a Hub id resolves to hf:// paths the same way)."""
    folder = tmp_path / "dataset"
    write_shards(folder / "data", count=2)
    for path in (folder / "data").iterdir():
        path.rename(folder / "data" / path.name.replace("part", "train"))
    assert [p.rsplit("/", 1)[-1] for p in streaming.hub_shards(str(folder))] == ["train-00.txt", "train-01.txt"]
    metrics = run_mlm.main([*TINY_BERT, f"--output_dir={tmp_path / 'out'}", f"--dataset_name={folder}", "--streaming",
                            "--max_steps=3", "--do_train", "--stream_lanes=2", "--max_eval_samples=4"])
    assert metrics["train_loss"] > 0


def test_a_stream_without_validation_data_and_nothing_held_out_trains(tmp_path):
    shards = write_shards(tmp_path / "corpus", count=2)
    metrics = run_mlm.main([*TINY_BERT, f"--output_dir={tmp_path / 'x'}", "--streaming", f"--train_file={shards}",
                            "--max_steps=2", "--do_train", "--validation_split_percentage=0"])
    assert metrics["train_loss"] > 0 and "eval_loss" not in metrics


def test_streaming_errors_name_the_fix(tmp_path):
    shards = write_shards(tmp_path / "corpus", count=2)
    base = [*TINY_BERT, f"--output_dir={tmp_path / 'x'}", "--streaming", f"--train_file={shards}", "--max_steps=2"]
    with pytest.raises(UserError, match="cannot feed 4 lanes"):
        run_mlm.main([*base, "--stream_lanes=4"])
    with pytest.raises(UserError, match="bound the run with --max_steps"):
        run_mlm.main([*base, "--max_train_samples=10"])
    with pytest.raises(UserError, match=r"--stream_lanes 3 must be a multiple of processes x dataloader workers \(2\)"):
        run_mlm.main([*base, "--stream_lanes=3", "--dataloader_num_workers=2"])
    with pytest.raises(UserError, match="--shuffle_buffer_size and --stream_lanes must be positive integers"):
        run_mlm.main([*base, "--stream_lanes=0"])
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "a.csv").write_text("text\nsome words here\n", encoding="utf-8")
    with pytest.raises(UserError, match="--streaming reads .txt, .jsonl .* not .*a.csv'; convert it"):
        run_mlm.main([*base[:-2], f"--train_file={tmp_path / 'tables'}", "--max_steps=2"])
    with pytest.raises(UserError, match="matches no data files"):
        run_mlm.main([*base[:-2], f"--train_file={tmp_path}/nothing-*.txt", "--max_steps=2"])
    run_mlm.main([*base, "--overwrite_output_dir", "--save_steps=1"])
    cut = tmp_path / "x" / "checkpoint-2" / streaming.POSITIONS_FILE
    cut.unlink()
    with pytest.raises(UserError, match="--ignore_data_skip"):
        streaming.resume_stream(None, str(cut.parent))


def test_held_out_blocks_are_never_trained_on(tmp_path):
    shards = [str(p) for p in sorted(write_shards(tmp_path / "c", count=2).iterdir())]
    stream = streaming.ShardedBlocks(shards, "text", pack, seed=1, lanes=1, held_out=30, rows_per_batch=25)
    held = [tuple(b["input_ids"].tolist()) for b in stream.held_out_blocks()]
    assert held == [(0, line) for line in range(30)]  # the first shard's first blocks, in order
    trained = {tuple(b) for b in blocks_of(stream, 1000)}
    assert not set(held) & trained and len(trained) == 240 - 30


def trained_blocks(record):
    """The text blocks a run trained on (masked positions restored from the labels), from every rank's file."""
    return unmasked([json.loads(line) for path in sorted(record.parent.glob(record.name + ".*"))
                     for line in path.read_text().splitlines()])


def two_processes_and_one(tmp_path, flags, workers, per_device_batch):
    """The blocks trained on by torchrun with 2 CPU processes (gloo, `workers` loader workers each) and by one
    process with twice the batch and no workers, both with `flags` (run_mlm.py's) and --stream_lanes 2 x workers."""
    from test_multiprocess import LAUNCH_TIMEOUT, launch_env, launcher_command

    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "record_stream_batches.py")
    common = ["run_mlm", *flags, "--streaming", "--save_strategy=no", "--do_train", f"--stream_lanes={2 * max(1, workers)}"]
    runs = []
    for name, launcher, batch, loader_workers in (("two", launcher_command("torchrun"), per_device_batch, workers),
                                                   ("one", [sys.executable], 2 * per_device_batch, 0)):
        record = tmp_path / f"{name}.jsonl"
        command = [*launcher, fixture, *common, f"--output_dir={tmp_path / name}",
                   f"--per_device_train_batch_size={batch}", f"--dataloader_num_workers={loader_workers}"]
        done = subprocess.run(command, env=launch_env(RECORD_BATCHES=str(record)), capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(trained_blocks(record))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_two_processes_train_on_the_blocks_one_process_trains_on(tmp_path, workers):
    """torchrun, 2 CPU processes (gloo), each reading its own lanes: no block twice, and together exactly the
    blocks one process with the same global batch (and the same --stream_lanes) trains on."""
    shards = write_shards(tmp_path / "corpus", count=8, lines_per_shard=200)
    flags = [*TINY_BERT, f"--train_file={shards}", "--max_steps=6", "--seed=2", "--shuffle_buffer_size=50"]
    two, one = two_processes_and_one(tmp_path, flags, workers, per_device_batch=4)
    print(f"{workers} workers: 2 processes trained on {len(two)} blocks ({len(set(two))} distinct), 1 process on "
          f"{len(one)} ({len(set(one))} distinct)")
    assert len(two) == len(one) == 6 * 8
    assert len(set(two)) == len(two) and sorted(two) == sorted(one)


@pytest.mark.slow
def test_two_processes_with_two_workers_resume_with_the_uninterrupted_batches(tmp_path):
    """torchrun, 2 processes x 2 loader workers, SIGTERM to both ranks during step 3: the rerun trains each rank on
    exactly the batches (token ids and labels) of the uninterrupted run, from the lane positions both ranks saved."""
    from test_multiprocess import LAUNCH_TIMEOUT, launch_env, launcher_command

    shards = write_shards(tmp_path / "corpus", count=8, lines_per_shard=200)
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "record_stream_batches.py")
    command = [*launcher_command("torchrun"), fixture, "run_mlm", *TINY_BERT, "--streaming", f"--train_file={shards}",
               "--max_steps=8", "--save_steps=100", "--do_train", "--seed=4", "--dataloader_num_workers=2",
               "--shuffle_buffer_size=30"]

    def launch(name, **env):
        done = subprocess.run([*command, f"--output_dir={tmp_path / name}"], capture_output=True, text=True,
                              env=launch_env(RECORD_BATCHES=str(tmp_path / f"{name}.jsonl"), **env), timeout=LAUNCH_TIMEOUT)
        records = {rank: [json.loads(line) for line in (tmp_path / f"{name}.jsonl.{rank}").read_text().splitlines()]
                   for rank in (0, 1)}
        for rank in records:
            (tmp_path / f"{name}.jsonl.{rank}").unlink()
        return done, records

    done, straight = launch("straight")
    assert done.returncode == 0, done.stderr[-3000:]
    done, _ = launch("cut", STOP_AT_STEP="2")
    assert done.returncode != 0 and (tmp_path / "cut" / "checkpoint-3" / streaming.POSITIONS_FILE).is_file()
    positions = json.loads((tmp_path / "cut" / "checkpoint-3" / streaming.POSITIONS_FILE).read_text())["positions"]
    assert sorted(positions) == ["0", "1", "2", "3"]  # both ranks' lanes, gathered into one file
    done, resumed = launch("cut")
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert [step for step, *_ in resumed[rank]] == [3, 4, 5, 6, 7]
        assert resumed[rank] == straight[rank][3:], rank
