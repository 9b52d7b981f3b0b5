"""The streamed path at corpus scale (issue 21): a 200 MB corpus in 16 shards built from ../shared's WikiText-2 and
tiny-shakespeare (lines shuffled, seeded, so text does not repeat in long runs of the same order; written to a
temporary folder, never committed). Measures:
- tokens/s one streamed loader worker delivers (BERT WordPiece, blocks of 128, MLM masks, batches of 32), with 1
  and 2 workers, on text it has not seen before, against what BERT-base training consumes on one H100 at 40% MFU;
- for run_mlm.py and run_span_t5.py: SIGTERM at step N, rerun; whether the batches after the resume are the
  uninterrupted run's (token ids and labels), and the seconds from the rerun's start to its first step, N = 20, 400.

    python benchmarks/streamed_corpus.py               # ~5 minutes on 2 CPU cores
    python benchmarks/streamed_corpus.py --quick       # smaller corpus and N, to check that it runs
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "record_stream_batches.py")
MINILM = os.path.join(SHARED, "models", "minilm-l6-h384-uncased")


def source_lines():
    paths = [os.path.join(SHARED, "data", "wikitext-2-raw", n) for n in ("wiki.valid.raw", "wiki.test.raw")]
    paths.append(os.path.join(SHARED, "data", "tinyshakespeare", "input.txt"))
    if not all(os.path.isfile(p) for p in paths):
        import data_utils

        paths = data_utils.write_embedded_corpus()[:1]  # no ../shared: Python's own docs
    lines = []
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            lines += [line.strip() for line in f.read().splitlines() if line.strip()]
    return lines


def write_corpus(folder, megabytes=200, shards=16, seed=0):
    """`shards` .txt files of megabytes/shards MB each: copies of the source lines, each copy shuffled anew."""
    os.makedirs(folder, exist_ok=True)
    lines, rng = source_lines(), random.Random(seed)
    shard_bytes, written, index, out = megabytes * 1e6 / shards, 0, 0, None
    while index < shards:
        rng.shuffle(lines)
        for line in lines:
            if out is None:
                out = open(os.path.join(folder, f"part-{index:03d}.txt"), "w", encoding="utf-8")
            out.write(line + "\n")
            written += len(line.encode()) + 1
            if written >= shard_bytes:
                out.close()
                out, written, index = None, 0, index + 1
                if index == shards:
                    break
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / 1e6


def h100_bert_base_tokens_per_second(mfu=0.4):
    """Tokens/s BERT-base training consumes on one H100 at `mfu` of the published bf16 dense peak, with the
    sparse MLM head (15% of positions) at 128 tokens: 0.4 x 989e12 / FLOPs per token."""
    import throughput
    from transformers import BertConfig, BertForMaskedLM

    flops = throughput.transformer_flops_per_token(BertForMaskedLM(BertConfig()), 128, head_fraction=0.15)
    peak = throughput.GPU_PEAK_TFLOPS["H100"][0] * 1e12
    return mfu * peak / flops, flops, peak


def loader_tokens_per_second(shards, workers, batches, batch_size=32, block=128):
    """Tokens/s a DataLoader over the stream delivers from its start (workers starting, first windows filled),
    masks included. Each worker reads a shard of its own: 200 batches of 32 x 128 are about 3 MB of text, less
    than one copy of the source lines, so the text is distinct."""
    import packing
    import run_mlm
    import streaming
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MINILM if os.path.isdir(MINILM) else "bert-base-uncased")
    encode = packing.TokenIds(tokenizer)

    def make_blocks(table):
        return packing.pack_token_ids(encode(packing.non_blank(table["text"])), block)

    stream = streaming.ShardedBlocks(shards, "text", make_blocks, seed=0, lanes=max(1, workers), shuffle_buffer_size=1000)
    collate = streaming.CollateWithPositions(run_mlm.FastMLMCollator(tokenizer, mlm_probability=0.15))
    loader = DataLoader(stream, batch_size=batch_size, collate_fn=collate, num_workers=workers,
                        multiprocessing_context="fork" if workers else None)
    start, tokens = time.perf_counter(), 0
    for batch, _ in zip(loader, range(batches * max(1, workers))):
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def run(script, args, env):
    done = subprocess.run([sys.executable, FIXTURE, script, *args], env=env, capture_output=True, text=True)
    if done.returncode not in (0, 143):
        raise RuntimeError(done.stderr[-3000:])
    return done.returncode


def batches_after(record, step):
    with open(record + ".0", encoding="utf-8") as f:
        return [json.loads(line) for line in f if json.loads(line)[0] >= step]


def resume_check(script, corpus, work, stops, extra_steps=5, workers=0):
    """Uninterrupted to max(stops) + extra_steps; for each N: SIGTERM at step N, rerun: the batches after N
    against the uninterrupted run's, and the rerun's seconds from start to first step. `workers`: loader workers."""
    tiny = {"run_mlm": ["--model_type=bert", "--config_overrides=hidden_size=32,num_hidden_layers=1,num_attention_heads=2,"
                        "intermediate_size=64,max_position_embeddings=128"],
            "run_span_t5": ["--model_type=t5", "--config_overrides=d_model=32,d_kv=16,num_heads=2,d_ff=64,num_layers=1",
                            "--tokenizer_vocab_size=2000"]}[script]
    if script == "run_mlm" and os.path.isdir(MINILM):
        tiny.append(f"--tokenizer_name={MINILM}")
    steps = max(stops) + extra_steps
    common = [*tiny, "--streaming", f"--train_file={corpus}", f"--max_steps={steps}", "--max_seq_length=128",
              "--per_device_train_batch_size=8", "--do_train", "--save_steps=100000", "--report_to=none",
              "--disable_tqdm=True", "--logging_steps=1", f"--cache_dir={os.path.join(work, 'cache')}", "--seed=3",
              f"--dataloader_num_workers={workers}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false"}
    straight = os.path.join(work, f"{script}-w{workers}-straight")
    run(script, [*common, f"--output_dir={straight}"], {**env, "RECORD_BATCHES": straight + ".jsonl"})
    results = {}
    for stop in stops:
        out = os.path.join(work, f"{script}-w{workers}-cut{stop}")
        record = out + ".jsonl"
        code = run(script, [*common, f"--output_dir={out}"],  # the signal during step `stop`: checkpoint-{stop}
                   {**env, "RECORD_BATCHES": record, "STOP_AT_STEP": str(stop - 1)})
        os.remove(record + ".0")
        start = time.time()
        run(script, [*common, f"--output_dir={out}"], {**env, "RECORD_BATCHES": record})
        with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as f:
            history = json.load(f)["log_history"]
        first = [h["seconds_to_first_step"] for h in history if "seconds_to_first_step" in h][-1]
        resumed, expected = batches_after(record, stop), batches_after(straight + ".jsonl", stop)
        results[stop] = {"stopped_with": code, "checkpoint": os.path.isdir(os.path.join(out, f"checkpoint-{stop}")),
                         "seconds_to_first_step": first, "rerun_seconds": round(time.time() - start, 1),
                         "steps_after_resume": len(resumed), "identical": resumed == expected and len(resumed) == steps - stop}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work_dir", default=None, help="where the corpus and runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="stream-bench-")
    corpus = os.path.join(work, "corpus")
    megabytes, stops, batches = (20, (5, 40), 20) if args.quick else (200, (20, 400), 200)
    size = write_corpus(corpus, megabytes)
    shards = sorted(os.path.join(corpus, n) for n in os.listdir(corpus))
    print(f"corpus: {size:.0f} MB in {len(shards)} shards ({corpus})", flush=True)
    need, flops, peak = h100_bert_base_tokens_per_second()
    print(f"BERT-base on one H100 at 40% MFU: 0.4 x {peak / 1e12:.0f} TFLOP/s / {flops / 1e9:.3f} GFLOP per token = "
          f"{need:,.0f} tokens/s; a quarter of it (4 workers feed one H100): {need / 4:,.0f} tokens/s per worker", flush=True)
    report = {"corpus_mb": round(size), "shards": len(shards), "h100_bert_base_tokens_per_second": round(need)}
    for workers in (1, 2):
        rate = loader_tokens_per_second(shards, workers, batches)
        report[f"loader_tokens_per_second_{workers}_workers"] = round(rate)
        print(f"streamed loader, {workers} worker(s): {rate:,.0f} tokens/s ({rate / workers:,.0f} per worker, "
              f"{rate / workers / (need / 4):.2f} of the per-worker need)", flush=True)
    for script in ("run_mlm", "run_span_t5"):
        results = resume_check(script, corpus, work, stops)
        report[script] = results
        for stop, r in results.items():
            print(f"{script}: SIGTERM at step {stop} (exit {r['stopped_with']}), rerun: first step {r['seconds_to_first_step']:.1f} s after "
                  f"start; {r['steps_after_resume']} batches after it identical: {r['identical']}", flush=True)
        early, late = (results[s]["seconds_to_first_step"] for s in stops)
        print(f"{script}: time to first step after resume, late / early = {late / early:.2f} (bound 1.5)", flush=True)
    path = os.path.join(work, "streaming.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(f"results: {path}")
    return report


if __name__ == "__main__":
    main()
