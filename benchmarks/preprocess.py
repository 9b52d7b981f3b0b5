"""Benchmark: tokenize and pack a large text corpus, run_mlm.py's pipeline against the Hugging Face example's.

    python benchmarks/preprocess.py                 # 50 MB corpus, num_proc 1 and 2
    python benchmarks/preprocess.py --size-mb 5     # what --quick uses
    python benchmarks/preprocess.py --breakdown-mb 5  # also: CPU time per step, cProfile of ours

The corpus is ../shared WikiText-2 (or the embedded corpus when that is missing) repeated into one temporary
.txt file of at least --size-mb. Both pipelines get the same tokenizer, the same raw Dataset (loaded afresh
into an empty cache folder for every timed run, so nothing is reused) and the same num_proc. Every timed run
is a fresh Python process with the tokenizer's threading at its default (TOKENIZERS_PARALLELISM unset), as
a user's run is; the pipelines take turns, 3 rounds by default, and the median counts:

  ours  run_mlm.py's preprocessing: blank lines dropped, only input_ids asked of the tokenizer (through
        data_utils.TokenIds: no character offsets, each space-separated piece tokenized once), and in the
        same map call data_utils.pack_token_ids cuts them into blocks with Arrow; through
        data_utils.cached_map, so the timing includes saving the result where the next run (a sweep's next
        trial) loads it from.
  HF    the approach of Hugging Face's examples/pytorch/language-modeling/run_mlm.py (written here from its
        description): tokenize every line keeping all the tokenizer's columns plus special_tokens_mask,
        then `group_texts`, which concatenates each column's Python lists (itertools.chain) and slices them
        into blocks.

Other code can call `run(quick=False, size_mb=None, num_procs=(1, 2), breakdown_mb=None, rounds=None)`.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import chain

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.join(REPO_ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import data_utils  # noqa: E402
from mlm_throughput import bench_tokenizer, corpus_files  # noqa: E402

BLOCK_SIZE = 128


def source_text(sources):
    """The source files' text, each once, in order."""
    return "".join(open(source, encoding="utf-8").read() for source in sources)


def make_corpus(path, size_mb, sources):
    """Write the source files' text repeatedly into `path` until it holds at least `size_mb` MB."""
    text = source_text(sources)
    target = int(size_mb * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            f.write(text)
            written += len(text.encode("utf-8"))
    return written


def load_raw(path, cache_dir):
    return data_utils.load_data_file(path, "--train_file", cache_dir=cache_dir)


def ours(raw, tokenizer, num_proc, cache_dir, block_size=BLOCK_SIZE):
    """run_mlm.py's section 5 for the default (packed) mode; keep the two in step."""
    text_column = "text"
    encode = data_utils.TokenIds(tokenizer)

    def tokenize(batch):
        encoded = encode(data_utils.non_blank(batch[text_column]))
        return data_utils.pack_token_ids(encoded, block_size)

    key = (data_utils.tokenizer_fingerprint(tokenizer), block_size, False, False, False)
    packed = data_utils.cached_map(raw.with_format("arrow"), tokenize, key, cache_dir, False, batched=True,
                                   batch_size=10_000, remove_columns=[text_column], num_proc=num_proc)
    return packed.with_format(None)


def hf_approach(raw, tokenizer, num_proc, block_size=BLOCK_SIZE):
    """Tokenize with every column the tokenizer gives, then concatenate Python lists and slice them."""

    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=["text"])

    def group_texts(examples):
        joined = {name: list(chain(*examples[name])) for name in examples.keys()}
        usable = len(joined["input_ids"]) // block_size * block_size  # the tail that fills no block is dropped
        return {name: [values[i : i + block_size] for i in range(0, usable, block_size)]
                for name, values in joined.items()}

    return tokenized.map(group_texts, batched=True, num_proc=num_proc)


def cpu_seconds():
    """CPU time of this process and of its finished children (map's worker pools are joined when map ends).
    On a shared machine it varies far less than wall time, which also counts the waits for a free core."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_pipeline(name, corpus, tokenizer, num_proc, scratch):
    """One timed run in a fresh cache folder; returns seconds for loading and for tokenize + pack."""
    cache = tempfile.mkdtemp(prefix=f"{name}-{num_proc}-", dir=scratch)
    try:
        start = time.perf_counter()
        raw = load_raw(corpus, os.path.join(cache, "datasets"))
        loaded = time.perf_counter()
        load_before = os.getloadavg()[0]
        cpu_start = cpu_seconds()
        if name == "ours":
            blocks = ours(raw, tokenizer, num_proc, cache)
        else:
            blocks = hf_approach(raw, tokenizer, num_proc)
        done = time.perf_counter()
        return {"pipeline": name, "num_proc": num_proc, "load_seconds": loaded - start, "seconds": done - loaded,
                "cpu_seconds": cpu_seconds() - cpu_start, "blocks": len(blocks), "columns": sorted(blocks.column_names),
                "tokens": len(blocks) * BLOCK_SIZE, "load_before": load_before, "load_after": os.getloadavg()[0]}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def time_in_fresh_process(name, corpus, tokenizer_path, num_proc, scratch):
    """time_pipeline in a new Python process, as a user's run starts: nothing imported, warmed or forked before,
    and the tokenizer's threading at its default (TOKENIZERS_PARALLELISM unset: the Rust tokenizer uses every
    core in the process that calls it; for num_proc >= 1, `datasets` sets TOKENIZERS_PARALLELISM=false for
    its worker processes, so each of them tokenizes on one core)."""
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    job = json.dumps({"name": name, "corpus": corpus, "tokenizer": tokenizer_path, "num_proc": num_proc, "scratch": scratch})
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--time-one", job], env=env, capture_output=True,
                          text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"preprocess {name} num_proc={num_proc} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def _time_one(job):
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    job = json.loads(job)
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    print(json.dumps(time_pipeline(job["name"], job["corpus"], tokenizer, job["num_proc"], job["scratch"])), flush=True)


def run(quick=False, size_mb=None, num_procs=(1, 2), work_dir=None, breakdown_mb=None, rounds=None):
    """Time both pipelines for every num_proc, each run in a fresh process, `rounds` times in turns (ours, HF,
    ours, HF, ...); rows carry the median of the rounds and every run's time. Returns rows, per-num_proc
    speed-ups (of the medians) and the set-up."""
    from transformers import AutoTokenizer

    size_mb = size_mb or (5 if quick else 50)
    rounds = rounds or (1 if quick else 3)
    scratch = tempfile.mkdtemp(prefix="preprocess_bench_", dir=work_dir)
    try:
        tokenizer_path, tokenizer_note = bench_tokenizer(os.path.join(scratch, "tokenizer"))
        train, valid, corpus_note = corpus_files(os.path.join(scratch, "embedded"))
        corpus = os.path.join(scratch, "corpus.txt")
        size = make_corpus(corpus, size_mb, [train, valid])
        runs = {}
        for round_ in range(rounds):
            for num_proc in num_procs:
                for name in ("ours", "hf"):
                    row = time_in_fresh_process(name, corpus, tokenizer_path, num_proc, scratch)
                    runs.setdefault((num_proc, name), []).append(row)
                    print(f"  preprocess round {round_ + 1}/{rounds} {name} num_proc={num_proc}: {row['seconds']:.1f} s "
                          f"(CPU {row['cpu_seconds']:.1f} s, load {row['load_before']:.1f})", flush=True)
        rows = []
        for (num_proc, name), timed in runs.items():
            row = dict(sorted(timed, key=lambda r: r["seconds"])[len(timed) // 2])  # the median run
            row["all_seconds"] = [r["seconds"] for r in timed]
            row["cpu_seconds"] = statistics.median(r["cpu_seconds"] for r in timed)
            row["mb_per_second"] = size / 1e6 / row["seconds"]
            rows.append(row)
        speedups, cpu_speedups = {}, {}
        for num_proc in num_procs:
            pair = {r["pipeline"]: r for r in rows if r["num_proc"] == num_proc}
            speedups[num_proc] = pair["hf"]["seconds"] / pair["ours"]["seconds"]
            cpu_speedups[num_proc] = pair["hf"]["cpu_seconds"] / pair["ours"]["cpu_seconds"]
        result = {"corpus_mb": size / 1e6, "corpus": corpus_note, "tokenizer": tokenizer_note, "block_size": BLOCK_SIZE,
                  "tokenizers_parallelism": "unset (the library default)", "rounds": rounds,
                  "rows": rows, "speedup": speedups, "cpu_speedup": cpu_speedups}
        if breakdown_mb:
            import datasets

            datasets.disable_progress_bars()
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
            result["breakdown"] = breakdown(tokenizer, corpus if breakdown_mb >= size_mb else None, breakdown_mb,
                                            [train, valid], scratch)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def breakdown(tokenizer, corpus, size_mb, sources, scratch, top=12):
    """Where the CPU time goes, in this process (num_proc None, so nothing hides in a worker): the Rust
    tokenizer alone, then each step of both pipelines, and cProfile's top functions of ours."""
    import cProfile
    import io
    import pstats

    if corpus is None:
        corpus = os.path.join(scratch, "breakdown.txt")
        make_corpus(corpus, size_mb, sources)
    raw = load_raw(corpus, os.path.join(scratch, "breakdown-datasets"))
    texts = data_utils.non_blank(raw["text"])
    steps = {}

    def timed(name, function):
        start = cpu_seconds()
        out = function()
        steps[name] = cpu_seconds() - start
        return out

    timed("Rust tokenizer alone, non-blank lines (encode_batch, batches of 1000)", lambda: [
        tokenizer.backend_tokenizer.encode_batch(texts[i : i + 1000]) for i in range(0, len(texts), 1000)])
    timed("Rust tokenizer without character offsets (encode_batch_fast), for comparison", lambda: [
        tokenizer.backend_tokenizer.encode_batch_fast(texts[i : i + 1000]) for i in range(0, len(texts), 1000)])
    encode = data_utils.TokenIds(tokenizer)
    timed("data_utils.TokenIds (each space-separated piece tokenized once), for comparison",
          lambda: [encode(texts[i : i + 1000]) for i in range(0, len(texts), 1000)])
    if encode.pieces is not None:
        steps["share of pieces tokenized"] = len(encode.pieces) / max(1, sum(len(t.split(" ")) for t in texts))
    # The corpus repeats its sources, which flatters remembered pieces: time the sources once, as first seen.
    distinct = data_utils.non_blank(source_text(sources).splitlines())
    steps["distinct text: MB"] = sum(map(len, distinct)) / 1e6
    timed("distinct text: Rust tokenizer without offsets (encode_batch_fast)", lambda: [
        tokenizer.backend_tokenizer.encode_batch_fast(distinct[i : i + 1000]) for i in range(0, len(distinct), 1000)])
    encode = data_utils.TokenIds(tokenizer)
    timed("distinct text: data_utils.TokenIds, nothing remembered at the start",
          lambda: [encode(distinct[i : i + 1000]) for i in range(0, len(distinct), 1000)])
    profiler = cProfile.Profile()
    profiler.enable()
    timed("ours: tokenize + pack + save", lambda: ours(raw, tokenizer, None, os.path.join(scratch, "breakdown-cache")))
    profiler.disable()
    tokenized = timed("HF: tokenize, all columns", lambda: raw.map(
        lambda batch: tokenizer(batch["text"], return_special_tokens_mask=True), batched=True, remove_columns=["text"]))

    def group(examples, block_size=BLOCK_SIZE):
        joined = {name: list(chain(*examples[name])) for name in examples.keys()}
        usable = len(joined["input_ids"]) // block_size * block_size
        return {name: [values[i : i + block_size] for i in range(0, usable, block_size)] for name, values in joined.items()}

    timed("HF: group_texts", lambda: tokenized.map(group, batched=True))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    lines = out.getvalue().splitlines()
    table_start = next(i for i, line in enumerate(lines) if line.strip().startswith("ncalls"))
    return {"size_mb": os.path.getsize(corpus) / 1e6, "cpu_seconds": steps,
            "ours_top_functions": "\n".join(lines[table_start:table_start + top + 1])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 5 MB corpus, one round")
    parser.add_argument("--size-mb", type=float, default=None)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=None, help="runs of each pipeline, in turns (default 3; 1 with --quick)")
    parser.add_argument("--breakdown-mb", type=float, default=None,
                        help="also break the CPU time down by step on a corpus of this size (in one process)")
    parser.add_argument("--time-one", default=None, help=argparse.SUPPRESS)  # the child process of one timed run
    args = parser.parse_args()
    if args.time_one:
        return _time_one(args.time_one)
    result = run(args.quick, args.size_mb, tuple(args.num_proc), breakdown_mb=args.breakdown_mb, rounds=args.rounds)
    for row in result["rows"]:
        print(f"{row['pipeline']:<5} num_proc={row['num_proc']}: {row['seconds']:7.1f} s (median of "
              f"{', '.join(f'{s:.1f}' for s in row['all_seconds'])})  {row['mb_per_second']:6.2f} MB/s"
              f"  {row['blocks']} blocks, columns {row['columns']}")
    for num_proc, speedup in result["speedup"].items():
        print(f"num_proc={num_proc}: ours is {speedup:.2f}x faster ({result['cpu_speedup'][num_proc]:.2f}x less CPU)")
    for step, seconds in result.get("breakdown", {}).get("cpu_seconds", {}).items():
        print(f"{seconds:7.2f} {'CPU s' if 'MB' not in step and 'share' not in step else ''}  {step}")


if __name__ == "__main__":
    main()
