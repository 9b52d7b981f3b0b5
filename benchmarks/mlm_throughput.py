"""Benchmark: run_mlm.py with the sparse MLM head (ours) against the dense head (the Hugging Face approach):
tokens/s, MFU, peak memory and perplexity, BERT-mini at sequence length 128 with BERT's 30,522-id vocabulary.

    python benchmarks/mlm_throughput.py            # batch 32, 20 steps a run, 3 rounds in turns
    python benchmarks/mlm_throughput.py --quick    # batch 4, 3 steps, 1 round: a smoke test

Each run is one `python run_mlm.py ...` process (so peak memory is its own), the two identical but for
`--sparse_mlm_head`: same tokenizer, data, seed and steps. Tokens/s is read from the Trainer's log history (one
log per step, throughput.ThroughputCallback) over the steps after the first; the variants take turns and the
median round counts, since one busy moment on a shared machine would otherwise decide the comparison. MFU is
the scripts' own: tokens/s x throughput.transformer_flops_per_token / throughput.cpu_peak_flops.
Other code can call `run(quick=False)`.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
MODEL_CONFIG = os.path.join(REPO_ROOT, "configs", "bert-mini.json")
VOCAB_SIZE = 30522  # BERT's uncased WordPiece vocabulary: the output layer's real cost
SEQ_LEN = 128
VARIANTS = {"ours (sparse head)": True, "HF (dense head)": False}  # name -> --sparse_mlm_head


def offline_env(cache_dir):
    """Environment for child processes: no network, no W&B, our caches in `cache_dir`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               HF_SCRIPTS_CACHE=cache_dir, PYTHONUNBUFFERED="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def corpus_files(cache_dir=None):
    """(train, eval, description): WikiText-2 raw from ../shared, else the embedded Python-docs corpus."""
    folder = os.path.join(SHARED, "data", "wikitext-2-raw")
    train, valid = os.path.join(folder, "wiki.test.raw"), os.path.join(folder, "wiki.valid.raw")
    if os.path.isfile(train) and os.path.isfile(valid):
        return train, valid, "WikiText-2 raw (train: wiki.test.raw, eval: wiki.valid.raw)"
    import data_utils

    train, valid = data_utils.write_embedded_corpus(cache_dir)
    return train, valid, "embedded corpus (pydoc_data.topics; ../shared WikiText not found)"


def bench_tokenizer(cache_dir):
    """(path, description) of a 30,522-id WordPiece tokenizer: MiniLM's from ../shared, else one trained here."""
    shared = os.path.join(SHARED, "models", "minilm-l6-h384-uncased")
    if os.path.isfile(os.path.join(shared, "tokenizer.json")):
        return shared, "MiniLM-L6-H384 uncased (BERT WordPiece, 30,522 ids)"
    path = os.path.join(cache_dir, "wordpiece-30522")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        import run_mlm

        train, _, _ = corpus_files(cache_dir)
        with open(train, encoding="utf-8") as f:
            tokenizer = run_mlm.train_wordpiece_tokenizer([[line for line in f if line.strip()]], VOCAB_SIZE, 512)
        # A small corpus yields fewer pieces: filler ids keep the output layer at BERT's size.
        tokenizer.add_tokens([f"[unused{i}]" for i in range(VOCAB_SIZE - len(tokenizer))])
        tokenizer.save_pretrained(path)
    return path, "WordPiece trained on the corpus, padded to 30,522 ids (../shared MiniLM not found)"


def step_throughput(log_history, warmup_steps):
    """Tokens/s over the logged steps after the warm-up (their tokens / their time), from one log per step."""
    logs = [r for r in log_history if "loss" in r]
    tokens = seconds = 0.0
    for before, record in zip(logs, logs[1:]):
        if record["step"] > warmup_steps and record.get("tokens_per_second"):
            step_tokens = record["num_input_tokens_seen"] - before["num_input_tokens_seen"]
            tokens, seconds = tokens + step_tokens, seconds + step_tokens / record["tokens_per_second"]
    if not seconds:
        raise RuntimeError("no per-step tokens_per_second in the log history (throughput.ThroughputCallback)")
    mfu = [r["mfu"] for r in logs if r["step"] > warmup_steps and "mfu" in r]
    return {"tokens_per_second": tokens / seconds, "mfu": statistics.mean(mfu) if mfu else None}


def run(quick=False, rounds=None):
    """Train both variants `rounds` times in turns; returns the settings, one row per variant (its median round,
    every round's tokens/s, the first round's perplexity) and the speed-up and perplexity gap."""
    batch, steps, eval_samples = (4, 3, 8) if quick else (32, 20, 512)
    rounds = rounds or (1 if quick else 3)
    work_dir = tempfile.mkdtemp(prefix="mlm_bench_")
    env = offline_env(os.path.join(work_dir, "cache"))
    tokenizer, tokenizer_note = bench_tokenizer(os.path.join(work_dir, "cache"))
    train_file, valid_file, corpus_note = corpus_files(os.path.join(work_dir, "cache"))
    runs = {name: [] for name in VARIANTS}
    try:
        for round_index in range(rounds):
            for name, sparse in VARIANTS.items():
                out = os.path.join(work_dir, f"{sparse}-{round_index}")
                argv = [f"--config_name={MODEL_CONFIG}", f"--tokenizer_name={tokenizer}", f"--train_file={train_file}",
                        f"--max_seq_length={SEQ_LEN}", f"--per_device_train_batch_size={batch}", f"--max_steps={steps}",
                        # a rate that moves the loss within a few dozen steps, so the perplexity check means something
                        "--learning_rate=1e-3", "--warmup_steps=0.1", "--seed=42", "--logging_steps=1",
                        "--save_strategy=no", "--report_to=none", "--disable_tqdm=True", f"--output_dir={out}",
                        "--do_train", f"--sparse_mlm_head={sparse}"]
                if round_index == 0:  # the perplexity: the first round's
                    argv += ["--do_eval", f"--validation_file={valid_file}", f"--max_eval_samples={eval_samples}",
                             f"--per_device_eval_batch_size={batch}"]
                load, start = os.getloadavg()[0], time.perf_counter()
                with open(out + ".log", "w", encoding="utf-8") as log:
                    code = subprocess.call([sys.executable, "run_mlm.py", *argv], cwd=REPO_ROOT, env=env, stdout=log,
                                           stderr=subprocess.STDOUT)
                if code:
                    with open(out + ".log", encoding="utf-8") as log:
                        raise RuntimeError(f"run_mlm.py exited with {code}:\n{''.join(log.readlines()[-15:])}")
                with open(os.path.join(out, "all_results.json"), encoding="utf-8") as f:
                    results = json.load(f)
                with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as f:
                    row = step_throughput(json.load(f)["log_history"], warmup_steps=1)
                row.update(wall_seconds=time.perf_counter() - start, load_before=load, perplexity=results.get("perplexity"),
                           peak_memory_mb=results["peak_memory_mb"])
                runs[name].append(row)
                print(f"  mlm round {round_index + 1}/{rounds} {name}: {row['tokens_per_second']:.0f} tokens/s, "
                      f"{row['peak_memory_mb']:.0f} MB (load {load:.1f})", flush=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    rows = {}
    for name, tries in runs.items():
        row = dict(sorted(tries, key=lambda r: r["tokens_per_second"])[len(tries) // 2])  # the median round
        row.update(perplexity=tries[0]["perplexity"], all_tokens_per_second=[r["tokens_per_second"] for r in tries])
        rows[name] = row
    ours, hf = (rows[name] for name in VARIANTS)
    return {"settings": {"batch": batch, "steps": steps, "rounds": rounds, "seq_len": SEQ_LEN, "eval_samples": eval_samples,
                         "model": "configs/bert-mini.json", "tokenizer": tokenizer_note, "corpus": corpus_note},
            "rows": rows, "speedup": ours["tokens_per_second"] / hf["tokens_per_second"],
            "perplexity_gap": abs(ours["perplexity"] - hf["perplexity"]) / hf["perplexity"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 4, 3 steps, 1 round: a smoke test")
    print(json.dumps(run(parser.parse_args().quick), indent=1))


if __name__ == "__main__":
    main()
