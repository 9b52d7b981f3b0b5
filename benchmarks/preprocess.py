"""Benchmark: tokenize and pack text into blocks of 128, run_mlm.py's pipeline against the Hugging Face example's,
on text that does not repeat (a corpus that repeats itself would flatter ours, which tokenizes each distinct
space-separated piece once).

    python benchmarks/preprocess.py            # every distinct text at hand (~4 MB), num_proc None and 2, 3 rounds
    python benchmarks/preprocess.py --quick    # 0.5 MB, num_proc None, 1 round

The corpus: ../shared WikiText-2 (test, valid) and tiny-shakespeare plus the embedded Python-docs corpus, each
once. Both pipelines get the same tokenizer and file, loaded afresh into an empty cache folder for every timed
run (nothing reused), in a fresh Python process with the tokenizer's threading at its default, as a user's
run starts; they take turns and the median round counts.

  ours  run_mlm.py's section 5: blank lines dropped, input_ids only (packing.TokenIds), blocks cut in Arrow
        (packing.pack_token_ids) in the same map call, saved through data_utils.cached_map for the next run.
  HF    the approach of Hugging Face's examples/pytorch/language-modeling/run_mlm.py (written from its
        description): tokenize keeping every column plus special_tokens_mask, then `group_texts`, which
        concatenates each column's Python lists and slices them into blocks.

Other code can call `run(quick=False)`.
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
import packing  # noqa: E402
from mlm_throughput import SHARED, bench_tokenizer  # noqa: E402

BLOCK_SIZE = 128


def write_distinct_corpus(path, cache_dir, max_mb=None):
    """Every text at hand, each once, into `path` (at most `max_mb`); returns (MB, description)."""
    sources = [os.path.join(SHARED, "data", *parts) for parts in
               (("wikitext-2-raw", "wiki.test.raw"), ("wikitext-2-raw", "wiki.valid.raw"), ("tinyshakespeare", "input.txt"))]
    sources = [s for s in sources if os.path.isfile(s)] + list(data_utils.write_embedded_corpus(cache_dir))
    text = "".join(open(source, encoding="utf-8").read() for source in sources)
    if max_mb:
        text = text[: int(max_mb * 1e6)]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return len(text.encode("utf-8")) / 1e6, " + ".join(os.path.basename(s) for s in sources) + ", each once"


def ours(raw, tokenizer, num_proc, cache_dir):
    """run_mlm.py's section 5 for the default (packed) mode; keep the two in step."""
    encode = packing.TokenIds(tokenizer)

    def tokenize(batch):
        return packing.pack_token_ids(encode(packing.non_blank(batch["text"])), BLOCK_SIZE)

    key = (data_utils.tokenizer_fingerprint(tokenizer), BLOCK_SIZE, False, False, False)
    return data_utils.cached_map(raw.with_format("arrow"), tokenize, key, cache_dir, False, batched=True,
                                 batch_size=10_000, remove_columns=["text"], num_proc=num_proc).with_format(None)


def hf_approach(raw, tokenizer, num_proc):
    """Tokenize with every column the tokenizer gives, then concatenate Python lists and slice them."""
    tokenized = raw.map(lambda batch: tokenizer(batch["text"], return_special_tokens_mask=True), batched=True,
                        num_proc=num_proc, remove_columns=["text"])

    def group_texts(examples):
        joined = {name: list(chain(*examples[name])) for name in examples.keys()}
        usable = len(joined["input_ids"]) // BLOCK_SIZE * BLOCK_SIZE  # the tail that fills no block is dropped
        return {name: [values[i : i + BLOCK_SIZE] for i in range(0, usable, BLOCK_SIZE)] for name, values in joined.items()}

    return tokenized.map(group_texts, batched=True, num_proc=num_proc)


def cpu_seconds():
    """CPU time of this process and its finished children (map's worker pools end with map)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _time_one(job):
    """One timed run (the child process): load the file into a fresh cache, then tokenize and pack."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    job = json.loads(job)
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    cache = tempfile.mkdtemp(dir=job["scratch"])
    raw = data_utils.load_data_file(job["corpus"], "--train_file", cache_dir=os.path.join(cache, "datasets"))
    start, cpu = time.perf_counter(), cpu_seconds()
    blocks = ours(raw, tokenizer, job["num_proc"], cache) if job["name"] == "ours" else hf_approach(raw, tokenizer, job["num_proc"])
    print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu, "blocks": len(blocks),
                      "columns": sorted(blocks.column_names)}), flush=True)
    shutil.rmtree(cache, ignore_errors=True)


def run(quick=False, num_procs=None, rounds=None):
    """Both pipelines for every num_proc, in turns, each run a fresh process; rows hold the median round."""
    num_procs = num_procs or ((None,) if quick else (None, 2))
    rounds = rounds or (1 if quick else 3)
    scratch = tempfile.mkdtemp(prefix="preprocess_bench_")
    try:
        tokenizer, tokenizer_note = bench_tokenizer(os.path.join(scratch, "tokenizer"))
        corpus = os.path.join(scratch, "corpus.txt")
        size_mb, corpus_note = write_distinct_corpus(corpus, os.path.join(scratch, "embedded"), 0.5 if quick else None)
        env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}  # the library default
        runs = {}
        for round_index in range(rounds):
            for num_proc in num_procs:
                for name in ("ours", "hf"):
                    job = json.dumps({"name": name, "corpus": corpus, "tokenizer": tokenizer, "num_proc": num_proc,
                                      "scratch": scratch})
                    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--time-one", job], env=env,
                                          capture_output=True, text=True)
                    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                    if done.returncode or not lines:
                        raise RuntimeError(f"preprocess {name} num_proc={num_proc} failed: {done.stderr[-2000:]}")
                    row = dict(json.loads(lines[-1]), pipeline=name, num_proc=num_proc, load_before=os.getloadavg()[0])
                    runs.setdefault((num_proc, name), []).append(row)
                    print(f"  preprocess round {round_index + 1}/{rounds} {name} num_proc={num_proc}: "
                          f"{row['seconds']:.1f} s (CPU {row['cpu_seconds']:.1f} s)", flush=True)
        rows = []
        for timed in runs.values():
            row = dict(sorted(timed, key=lambda r: r["seconds"])[len(timed) // 2])
            row.update(all_seconds=[r["seconds"] for r in timed], mb_per_second=size_mb / row["seconds"],
                       cpu_seconds=statistics.median(r["cpu_seconds"] for r in timed))
            rows.append(row)
        speedup = {}
        for num_proc in num_procs:
            pair = {r["pipeline"]: r for r in rows if r["num_proc"] == num_proc}
            speedup[str(num_proc)] = pair["hf"]["seconds"] / pair["ours"]["seconds"]
        return {"corpus_mb": size_mb, "corpus": corpus_note, "tokenizer": tokenizer_note, "block_size": BLOCK_SIZE,
                "rounds": rounds, "rows": rows, "speedup": speedup}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.5 MB, num_proc None, one round")
    parser.add_argument("--time-one", default=None, help=argparse.SUPPRESS)  # the child process of one timed run
    args = parser.parse_args()
    if args.time_one:
        return _time_one(args.time_one)
    print(json.dumps(run(args.quick), indent=1))


if __name__ == "__main__":
    main()
