"""Benchmark: run_mlm.py training throughput, MFU and peak memory, our sparse MLM head against the Hugging Face
approach (dense head over every position), fp32 and bf16, plus the perplexity parity check and a profile.

    python benchmarks/mlm_throughput.py                 # BERT-mini (configs/bert-mini.json), seq 128, batch 32
    python benchmarks/mlm_throughput.py --quick         # batch 4, a few steps: a smoke test
    python benchmarks/mlm_throughput.py --profile fp32  # torch.profiler table of one training step

Each variant is one `python run_mlm.py ...` process (so peak memory is that run's own), identical but for
`--sparse_mlm_head` and `--bf16`: same tokenizer (30,522 WordPiece ids), data, seed and steps. Throughput is
read from the Trainer's log history (train_utils.ThroughputCallback's tokens_per_second, one log per step)
over the steps after the warm-up. MFU = tokens/s x train_utils.transformer_flops_per_token / peak, the peak
being the best matrix-multiply rate measured on this machine (benchmarks/run.py passes it in).
Other code can call `run(quick=False, peaks=None)`, `profile_step(...)` and `experiments(...)`.
"""

import argparse
import json
import os
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

VARIANTS = {  # name -> --sparse_mlm_head
    "ours (sparse head)": True,
    "HF (dense head)": False,
}


def offline_env(cache_dir):
    """Environment for child processes: no network, no W&B, our caches in `cache_dir`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               HF_SCRIPTS_CACHE=cache_dir, PYTHONUNBUFFERED="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked map workers would warn and fall back anyway
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
        import data_utils

        train, _, _ = corpus_files(cache_dir)
        with open(train, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        tokenizer = data_utils.train_wordpiece_tokenizer([lines], VOCAB_SIZE, 512)
        # A small corpus yields fewer pieces than asked for; filler ids keep the output layer at BERT's size,
        # which is what the sparse-head comparison is about.
        missing = VOCAB_SIZE - len(tokenizer)
        if missing > 0:
            tokenizer.add_tokens([f"[unused{i}]" for i in range(missing)])
        tokenizer.save_pretrained(path)
    return path, "WordPiece trained on the corpus, padded to 30,522 ids (../shared MiniLM not found)"


def flops_per_token(sparse, mlm_probability=0.15):
    """train_utils.transformer_flops_per_token for BERT-mini with a 30,522-id head, as run_mlm.py computes it."""
    import train_utils
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(MODEL_CONFIG)
    config.vocab_size = VOCAB_SIZE
    model = AutoModelForMaskedLM.from_config(config)
    return train_utils.transformer_flops_per_token(model, SEQ_LEN, head_fraction=mlm_probability if sparse else 1.0)


def mlm_argv(output_dir, tokenizer, train_file, valid_file, *, batch, steps, sparse, bf16, eval_samples, seed=42):
    argv = [
        f"--config_name={MODEL_CONFIG}", f"--tokenizer_name={tokenizer}", f"--train_file={train_file}",
        f"--max_seq_length={SEQ_LEN}", f"--per_device_train_batch_size={batch}", f"--max_steps={steps}",
        # A learning rate that moves the loss within a few dozen steps, so the perplexity check means something.
        "--learning_rate=1e-3", "--warmup_steps=0.1", f"--seed={seed}", "--logging_steps=1",
        "--save_strategy=no", "--report_to=none", "--disable_tqdm=True", f"--output_dir={output_dir}",
        "--overwrite_output_dir", "--do_train", f"--sparse_mlm_head={sparse}", f"--bf16={bf16}",
    ]
    if eval_samples:
        argv += ["--do_eval", f"--validation_file={valid_file}", f"--max_eval_samples={eval_samples}",
                 f"--per_device_eval_batch_size={batch}"]
    return argv


def run_script(script, argv, log_path, env):
    """Run `python script argv` from the repository root; returns wall seconds. Raises with the log's tail."""
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.call([sys.executable, script, *argv], cwd=REPO_ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-15:])
        raise RuntimeError(f"{script} exited with {code}:\n{tail}")
    return seconds


def run_in_process(argv, env):
    """run_mlm.main(argv) in this process under `env`'s variables; returns wall seconds. Saves the ~20 s a
    fresh interpreter spends importing, at the price of a process-wide peak memory figure."""
    import run_mlm

    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    start = time.perf_counter()
    try:
        run_mlm.main(argv)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return time.perf_counter() - start


def step_throughput(log_history, warmup_steps):
    """Tokens/s over the logged steps after the warm-up (total tokens / total time), the best step, and the
    Trainer's own MFU figures, from a log history with one training log per step."""
    records = [r for r in log_history if "loss" in r and r.get("step", 0) > warmup_steps]
    tokens_seen = {r["step"]: r.get("num_input_tokens_seen") for r in log_history if "loss" in r}
    rates, seconds, tokens = [], 0.0, 0
    for record in records:
        rate = record.get("tokens_per_second")
        before = tokens_seen.get(record["step"] - 1)
        if not rate or before is None or record.get("num_input_tokens_seen") is None:
            continue
        step_tokens = record["num_input_tokens_seen"] - before
        rates.append(rate)
        tokens += step_tokens
        seconds += step_tokens / rate
    if not rates:
        raise RuntimeError("no per-step tokens_per_second in the log history (ThroughputCallback)")
    logged_mfu = [r["mfu"] for r in records if "mfu" in r]
    return {
        "tokens_per_second": tokens / seconds,
        "best_step_tokens_per_second": max(rates),
        "measured_steps": len(rates),
        "logged_mfu": sum(logged_mfu) / len(logged_mfu) if logged_mfu else None,
    }


def beside_rate(dtype, quick=False):
    """The matmul rate (FLOP/s, train_utils.measure_peak_flops: 0.5 s at n=2048, a smoke-test size in quick mode)
    at this moment, measured next to each run for the MFU "beside" it: a shared machine's busy stretches slow the
    run and this product alike, while the run's peak is its quietest moment."""
    import torch
    import train_utils

    size, seconds = (256, 0.02) if quick else (2048, 0.5)
    return train_utils.measure_peak_flops(torch.float32 if dtype == "fp32" else torch.bfloat16, size=size,
                                          seconds=seconds)


def settings(quick):
    """(batch, fp32 steps, bf16 steps, warm-up steps, eval samples, rounds). On a CPU without bf16 matrix units the
    scripts compute bf16 products in fp32 (train_utils.bf16_linears_through_fp32), so bf16 runs as long as fp32.
    The variants take turns, a round at a time, and the median round counts: this machine is shared, and one run
    at a busy moment would otherwise decide a comparison."""
    if quick:
        return dict(batch=4, fp32_steps=3, bf16_steps=2, warmup=1, eval_samples=8, bf16_batch=2, rounds=1)
    return dict(batch=32, fp32_steps=20, bf16_steps=20, warmup=1, eval_samples=512, bf16_batch=32, rounds=3)


def run(quick=False, peaks=None, work_dir=None, dtypes=("fp32", "bf16"), in_process=None):
    """Train every variant; returns settings, one row per (dtype, variant) and the checks.

    `peaks`: {"fp32": FLOP/s, "bf16": FLOP/s} for MFU; measured here (train_utils.measure_peak_flops) if None.
    `in_process` (default: only in quick mode) runs run_mlm.main here instead of a `python run_mlm.py` per
    variant: faster to start, but peak memory is then this process's.
    """
    in_process = quick if in_process is None else in_process
    import train_utils

    cfg = settings(quick)
    owned = work_dir is None
    work_dir = work_dir or tempfile.mkdtemp(prefix="mlm_bench_")
    cache = os.path.join(work_dir, "cache")
    env = offline_env(cache)
    tokenizer, tokenizer_note = bench_tokenizer(cache)
    train_file, valid_file, corpus_note = corpus_files(cache)
    if peaks is None:
        import torch

        peaks = {"fp32": train_utils.measure_peak_flops(torch.float32),
                 "bf16": train_utils.measure_peak_flops(torch.bfloat16)}
    flops = {sparse: flops_per_token(sparse) for sparse in VARIANTS.values()}
    runs = {}  # (dtype, variant) -> one row per round
    for round_index in range(cfg["rounds"]):
        for dtype in dtypes:
            steps = cfg["fp32_steps"] if dtype == "fp32" else cfg["bf16_steps"]
            eval_samples = cfg["eval_samples"] if round_index == 0 else 0  # perplexity: the first round's
            for name, sparse in VARIANTS.items():
                out = os.path.join(work_dir, f"{dtype}-{'sparse' if sparse else 'dense'}-{round_index}")
                batch = cfg["batch"] if dtype == "fp32" else cfg["bf16_batch"]
                argv = mlm_argv(out, tokenizer, train_file, valid_file, batch=batch, steps=steps, sparse=sparse,
                                bf16=dtype == "bf16", eval_samples=eval_samples)
                load_before = os.getloadavg()[0]
                rate_before = beside_rate(dtype, quick)
                wall = run_in_process(argv, env) if in_process else run_script("run_mlm.py", argv, out + ".log", env)
                rate_after = beside_rate(dtype, quick)
                with open(os.path.join(out, "all_results.json"), encoding="utf-8") as f:
                    results = json.load(f)
                with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as f:
                    history = json.load(f)["log_history"]
                row = {"dtype": dtype, "variant": name, "sparse_mlm_head": sparse, "steps": steps,
                       "warmup_steps": cfg["warmup"], "batch": batch, "wall_seconds": wall,
                       "load_before": load_before, "load_after": os.getloadavg()[0],
                       "peak_memory_mb": results.get("peak_memory_mb"), "train_loss": results.get("train_loss"),
                       "perplexity": results.get("perplexity"), "flops_per_token": flops[sparse]}
                row.update(step_throughput(history, cfg["warmup"]))
                if rate_before and rate_after:  # the machine's matmul rate around this run, for MFU beside
                    row["peak_beside"] = (rate_before + rate_after) / 2
                    row["mfu_beside"] = row["tokens_per_second"] * flops[sparse] / row["peak_beside"]
                runs.setdefault((dtype, name), []).append(row)
                print(f"  mlm round {round_index + 1}/{cfg['rounds']} {dtype} {name}: "
                      f"{row['tokens_per_second']:.0f} tokens/s, {row['peak_memory_mb']:.0f} MB (load {load_before:.1f})",
                      flush=True)
    rows = []
    for (dtype, name), tries in runs.items():
        row = dict(sorted(tries, key=lambda r: r["tokens_per_second"])[len(tries) // 2])  # the median round
        row.update(perplexity=tries[0]["perplexity"], peak_memory_mb=max(r["peak_memory_mb"] for r in tries),
                   rounds=len(tries), all_tokens_per_second=[r["tokens_per_second"] for r in tries])
        row["mfu"] = row["tokens_per_second"] * row["flops_per_token"] / peaks[dtype]
        if all("mfu_beside" in r for r in tries):
            row["all_mfu_beside"] = [r["mfu_beside"] for r in tries]
            row["mfu_beside"] = statistics.median(row["all_mfu_beside"])
            row["all_peak_beside_gflops"] = [round(r["peak_beside"] / 1e9, 1) for r in tries]
        row.pop("peak_beside", None)  # one round's; the list above has every round's
        row["achieved_gflops"] = row["tokens_per_second"] * row["flops_per_token"] / 1e9
        rows.append(row)
        print(f"  mlm {dtype} {name}: {row['tokens_per_second']:.0f} tokens/s (median of {len(tries)}), "
              f"MFU {row['mfu']:.1%}" + (f", beside {row['mfu_beside']:.1%}" if "mfu_beside" in row else ""), flush=True)
    result = {"settings": dict(cfg, seq_len=SEQ_LEN, model=os.path.relpath(MODEL_CONFIG, REPO_ROOT), in_process=in_process,
                               tokenizer=tokenizer_note, corpus=corpus_note, vocab_size=VOCAB_SIZE),
              "peaks": peaks, "rows": rows, "speedup": {}, "parity": None}
    for dtype in dtypes:  # speed-up and perplexity parity per dtype; result["parity"] stays fp32's (the target's)
        pair = {r["sparse_mlm_head"]: r for r in rows if r["dtype"] == dtype}
        if len(pair) != 2:
            continue
        result["speedup"][dtype] = pair[True]["tokens_per_second"] / pair[False]["tokens_per_second"]
        if pair[True]["perplexity"] and pair[False]["perplexity"]:
            ours, theirs = pair[True]["perplexity"], pair[False]["perplexity"]
            result.setdefault("parity_by_dtype", {})[dtype] = {
                "steps": cfg[f"{dtype}_steps"], "eval_samples": cfg["eval_samples"], "ours": ours, "hf": theirs,
                "relative_difference": abs(ours - theirs) / theirs}
    result["parity"] = result.get("parity_by_dtype", {}).get("fp32")
    if owned and not os.environ.get("KEEP_BENCH_FILES"):
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------------
# Profile: where the time of one training step goes
# ---------------------------------------------------------------------------------------------------

CATEGORIES = (  # first match wins; names are aten op names
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                "aten::_scaled_dot_product_flash_attention_for_cpu")),
    ("dropout RNG", ("aten::bernoulli_", "aten::bernoulli", "aten::random_")),
    ("optimizer", ("aten::_fused_adamw_", "aten::_fused_adam_", "aten::_foreach_")),
    ("dtype casts / copies", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous")),
)


def _category(name):
    for category, prefixes in CATEGORIES:
        if any(name == p or name.startswith(p) for p in prefixes):
            return category
    return "elementwise and other"


def profile_step(dtype="fp32", sparse=True, batch=32, work_dir=None, top=12):
    """torch.profiler over one training step of run_mlm.main (in this process, after one warm-up step).

    Returns the step's wall seconds, the share of op time per category and the top ops by self time.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    import run_mlm
    import train_utils

    work_dir = work_dir or tempfile.mkdtemp(prefix="mlm_profile_")
    cache = os.path.join(work_dir, "cache")
    for key, value in offline_env(cache).items():
        os.environ.setdefault(key, value)
    tokenizer, _ = bench_tokenizer(cache)
    train_file, valid_file, _ = corpus_files(cache)

    class ProfileOneStep(TrainerCallback):
        def __init__(self):
            self.profiler, self.seconds = None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:  # step 0 was the warm-up
                self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                self.profiler.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None and self.seconds is None:
                self.seconds = time.perf_counter() - self.start
                self.profiler.__exit__(None, None, None)

    callback = ProfileOneStep()
    original = train_utils.add_callbacks

    def add_callbacks(trainer, *args, **kwargs):
        original(trainer, *args, **kwargs)
        trainer.add_callback(callback)

    train_utils.add_callbacks = add_callbacks
    try:
        out = os.path.join(work_dir, f"profile-{dtype}")
        run_mlm.main(mlm_argv(out, tokenizer, train_file, valid_file, batch=batch, steps=2, sparse=sparse,
                              bf16=dtype == "bf16", eval_samples=0))
    finally:
        train_utils.add_callbacks = original
    events = [e for e in callback.profiler.key_averages() if e.key.startswith("aten::")]
    # Self times of aten ops add up to the op time without double counting (aten::linear calls aten::addmm).
    total = sum(e.self_cpu_time_total for e in events) or 1
    shares = {}
    for event in events:
        category = _category(event.key)
        shares[category] = shares.get(category, 0.0) + event.self_cpu_time_total / total
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    matmuls = []  # the rate of each matmul shape shows which ones run far below the peak
    for event in callback.profiler.key_averages(group_by_input_shape=True):
        if event.key not in ("aten::mm", "aten::addmm") or not event.self_cpu_time_total:
            continue
        shapes = [s for s in event.input_shapes if len(s) == 2]
        if len(shapes) != 2 or shapes[0][1] != shapes[1][0]:
            continue
        (m, k), (_, n) = shapes
        seconds = event.self_cpu_time_total / 1e6
        matmuls.append({"op": event.key, "shapes": f"[{m}, {k}] @ [{k}, {n}]", "k": k, "calls": event.count,
                        "self_seconds": seconds, "gflops": 2 * m * k * n * event.count / seconds / 1e9})
    matmuls.sort(key=lambda r: r["self_seconds"], reverse=True)
    return {
        "dtype": dtype, "sparse_mlm_head": sparse, "batch": batch, "step_seconds": callback.seconds,
        "op_seconds": total / 1e6, "load": os.getloadavg()[0],
        "shares": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
        "top_ops": [{"op": e.key, "calls": e.count, "self_seconds": e.self_cpu_time_total / 1e6,
                     "share": e.self_cpu_time_total / total} for e in ops],
        "matmuls": matmuls[:8],
    }


# ---------------------------------------------------------------------------------------------------
# Fix experiments: the same step under settings that could raise MFU, alternated to share the noise
# ---------------------------------------------------------------------------------------------------

def experiments(quick=False, batch=None, rounds=None):
    """Median seconds per training step of BERT-mini (sparse head) under each setting, in this process.

    Settings run in turns (A B C A B C ...), so a change in the machine's load hits all of them alike.
    """
    import statistics

    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    import train_utils

    train_utils.keep_freed_memory_for_reuse()  # as the scripts do before training on a CPU
    batch = batch or (4 if quick else 32)
    rounds = rounds or (1 if quick else 3)
    bf16_batch = max(1, batch // 4)  # with torch's bf16 GEMM a step of batch 32 takes ~45 s on this CPU
    generator = torch.Generator().manual_seed(0)

    def make(dtype="fp32", attn="sdpa", dropout=True, through_fp32=False, threads=None, size=batch, torch_dropout=False):
        config = AutoConfig.from_pretrained(MODEL_CONFIG)
        config.vocab_size = VOCAB_SIZE
        config._attn_implementation = attn
        if not dropout:
            config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        torch.manual_seed(0)
        model = AutoModelForMaskedLM.from_config(config)
        train_utils.enable_sparse_mlm_head(model)
        model.train()
        if through_fp32:
            train_utils.bf16_through_fp32(model)
        if not torch_dropout:
            train_utils.use_cpu_dropout(model)  # as train_utils.train does on a CPU
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the Trainer's default
        ids = torch.randint(5, VOCAB_SIZE, (size, SEQ_LEN), generator=generator)
        labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.15, ids, -100)

        def step():
            previous = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    loss = model(input_ids=ids, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            finally:
                torch.set_num_threads(previous)

        step()  # warm-up
        return step

    threads = torch.get_num_threads()
    through = train_utils.bf16_goes_through_fp32(torch.bfloat16)  # what the scripts do for bf16 on this CPU
    setups = {
        f"fp32 baseline (the scripts: SDPA, CPU dropout, {threads} threads, batch {batch})": (make(), batch, "fp32"),
        "fp32 torch's dropout (before train_utils.use_cpu_dropout)": (make(torch_dropout=True), batch, "fp32"),
        "fp32 eager attention": (make(attn="eager"), batch, "fp32"),
        "fp32 1 thread": (make(threads=1), batch, "fp32"),
        f"fp32 batch {2 * batch}": (make(size=2 * batch), 2 * batch, "fp32"),
        "fp32 no dropout (changes the model; lets SDPA use its fused kernel)": (make(dropout=False), batch, "fp32"),
    }
    if through:
        setups.update({
            f"bf16 through fp32 (the scripts on this CPU), batch {batch}": (make("bf16", through_fp32=True), batch, "bf16"),
            "bf16 torch's dropout (before train_utils.use_cpu_dropout)": (
                make("bf16", through_fp32=True, torch_dropout=True), batch, "bf16"),
            f"bf16 with torch's bf16 GEMM (batch {bf16_batch})": (make("bf16", size=bf16_batch), bf16_batch, "bf16"),
            f"bf16 through fp32 (batch {bf16_batch})": (make("bf16", through_fp32=True, size=bf16_batch), bf16_batch, "bf16"),
            f"fp32 (batch {bf16_batch}, for the bf16 rows)": (make(size=bf16_batch), bf16_batch, "fp32"),
        })
    else:
        setups.update({
            f"bf16 with torch's bf16 GEMM (the scripts on this CPU), batch {batch}": (make("bf16"), batch, "bf16"),
            "bf16 torch's dropout (before train_utils.use_cpu_dropout)": (make("bf16", torch_dropout=True), batch, "bf16"),
            "bf16 eager attention": (make("bf16", attn="eager"), batch, "bf16"),
            f"bf16 through fp32 (batch {batch})": (make("bf16", through_fp32=True), batch, "bf16"),
        })
    times = {name: [] for name in setups}
    for _ in range(rounds):
        for name, (step, _, _) in setups.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    flops = flops_per_token(True)
    rows = []
    for name, (_, size, dtype) in setups.items():
        seconds = statistics.median(times[name])
        rows.append({"setting": name, "dtype": dtype, "batch": size, "step_seconds": seconds,
                     "tokens_per_second": size * SEQ_LEN / seconds,
                     "achieved_gflops": size * SEQ_LEN * flops / seconds / 1e9})
    return {"rounds": rounds, "threads": threads, "load": os.getloadavg()[0], "rows": rows}


COMPETING_JOB = "import torch\na = torch.randn(768, 768)\nwhile True:\n    a @ a\n"


def wait_policy_ab(quick=False, rounds=None):
    """Seconds per fp32 training step (BERT-mini, sparse head) in fresh processes with libgomp's default wait
    policy (spin 300,000 iterations, then sleep), with OMP_WAIT_POLICY=PASSIVE (sleep at once) and with
    GOMP_SPINCOUNT=10000 (what the scripts set), taken in turns: on the machine as it is, and beside a competing
    job (another 2-thread torch process doing matmuls, as a second training run on the same cores would)."""
    import statistics

    batch, steps = (4, 2) if quick else (32, 6)
    rounds = rounds or (1 if quick else 3)
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import mlm_throughput as m; "
            f"print(m.step_stats({batch}, {steps}, keep_freed_memory=True)['step_seconds'])")  # as the scripts run
    default_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    settings = {"libgomp default (spin, then sleep)": default_env,
                "OMP_WAIT_POLICY=PASSIVE": {**default_env, "OMP_WAIT_POLICY": "PASSIVE"},
                "GOMP_SPINCOUNT=10000 (the scripts)": {**default_env, "GOMP_SPINCOUNT": "10000"}}
    rows = []
    for condition in ("alone", "beside a competing 2-thread job"):
        competitor = None
        if condition != "alone":
            competitor = subprocess.Popen([sys.executable, "-c", COMPETING_JOB], env=default_env)
            time.sleep(2)
        times = {name: [] for name in settings}
        try:
            for _ in range(rounds):
                for name, env in settings.items():
                    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                                         text=True, check=True)
                    times[name].append(float(out.stdout.strip().splitlines()[-1]))
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
        rows += [{"condition": condition, "setting": name, "step_seconds": statistics.median(values), "all": values,
                  "tokens_per_second": batch * SEQ_LEN / statistics.median(values)} for name, values in times.items()]
    return {"batch": batch, "rounds": rounds, "load": os.getloadavg()[0], "rows": rows}


def step_stats(batch, steps, keep_freed_memory=False):
    """Median seconds of `steps` fp32 training steps of BERT-mini with the sparse head after one warm-up, and
    what the timed steps cost the kernel: minor page faults and system CPU seconds per step, peak RSS in MB.
    `keep_freed_memory` applies train_utils.keep_freed_memory_for_reuse first, as the scripts' training does."""
    import resource
    import statistics

    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM

    import train_utils

    applied = train_utils.keep_freed_memory_for_reuse() if keep_freed_memory else False
    config = AutoConfig.from_pretrained(MODEL_CONFIG)
    config.vocab_size = VOCAB_SIZE
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config)
    train_utils.enable_sparse_mlm_head(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(5, VOCAB_SIZE, (batch, SEQ_LEN))
    labels = torch.where(torch.rand(ids.shape) < 0.15, ids, -100)
    times = []
    for i in range(steps + 1):
        if i == 1:
            before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"step_seconds": statistics.median(times[1:]), "applied": applied,
            "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "system_seconds_per_step": (after.ru_stime - before.ru_stime) / steps,
            "peak_rss_mb": train_utils.peak_memory_mb()}  # this process's own peak (VmHWM), not its parent's


def malloc_ab(quick=False, rounds=None):
    """fp32 training steps (BERT-mini, sparse head) in fresh processes, in turns: glibc's default malloc
    settings against train_utils.keep_freed_memory_for_reuse (what the scripts do before CPU training).
    Per setting: the median over rounds of each process's median step, page faults and kernel seconds per
    step, and peak RSS."""
    import statistics

    batch, steps = (4, 2) if quick else (32, 8)
    rounds = rounds or (1 if quick else 4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    settings = {"glibc default": False, "keep freed memory for reuse (the scripts, on CPU)": True}
    runs = {name: [] for name in settings}
    for _ in range(rounds):
        for name, keep in settings.items():
            code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import mlm_throughput as m; "
                    f"print(json.dumps(m.step_stats({batch}, {steps}, keep_freed_memory={keep})))")
            out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                                 text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for name, values in runs.items():
        seconds = statistics.median(v["step_seconds"] for v in values)
        rows.append({"setting": name, "step_seconds": seconds, "all": [v["step_seconds"] for v in values],
                     "tokens_per_second": batch * SEQ_LEN / seconds, "applied": all(v["applied"] for v in values),
                     **{key: statistics.median(v[key] for v in values)
                        for key in ("page_faults_per_step", "system_seconds_per_step", "peak_rss_mb")}})
    return {"batch": batch, "steps": steps, "rounds": rounds, "load": os.getloadavg()[0], "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 4 and a few steps: a smoke test")
    parser.add_argument("--profile", choices=("fp32", "bf16"), help="profile one step instead")
    parser.add_argument("--experiments", action="store_true", help="time the fix experiments instead")
    args = parser.parse_args()
    if args.profile:
        result = profile_step(args.profile, batch=4 if args.quick else (32 if args.profile == "fp32" else 8))
    elif args.experiments:
        result = {"in_process": experiments(args.quick), "wait_policy": wait_policy_ab(args.quick),
                  "malloc": malloc_ab(args.quick)}
    else:
        result = run(args.quick)
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
