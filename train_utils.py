"""Trainer plumbing shared by the three scripts: logging set-up, output folder and resume rules,
throughput/MFU and sweep-metrics callbacks, the W&B run config, and results files.

Nothing here is a place students are expected to edit; the task-specific code stays in the scripts.
"""

import ctypes
import inspect
import json
import logging
import math
import os
import platform
import re
import resource
import signal
import sys
import threading
import time
import zipfile

import datasets
import torch
import torch.nn.functional as F
import transformers
from transformers import TrainerCallback

from arguments import UserError, to_config_dict

logger = logging.getLogger(__name__)

RUN_MARKER = "run_info.json"  # written into every output_dir we use: tells our files from a user's
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def setup_logging(training_args):
    """One log format for all scripts; replicas of a multi-process run only warn."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)]
    )
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.getLogger().setLevel(level)
    library_level = training_args.get_process_log_level()  # --log_level; libraries stay at warning by default
    datasets.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.set_verbosity(library_level)


def finalize_training_args(training_args, argv, script_name):
    """Defaults that depend on the run rather than on one flag; shared by all scripts."""
    given = {a.split("=")[0] for a in argv}
    if "--output_dir" not in given and training_args.output_dir in (None, "trainer_output"):
        training_args.output_dir = default_output_dir(script_name)
    if os.environ.get("WANDB_SWEEP_ID") and "--report_to" not in given and training_args.report_to in ([], ["none"], "none", None):
        training_args.report_to = ["wandb"]  # launched by `wandb agent`: the sweep needs the metrics in W&B
    # transformers turns do_eval on by itself for any --eval_strategy but "no": that alone asks for no eval-only run
    asked_eval = training_args.do_eval and ("--do_eval" in given or training_args.eval_strategy == "no")
    if not (training_args.do_train or asked_eval or training_args.do_predict):
        training_args.do_train = training_args.do_eval = True  # nothing asked for: do the whole job
    if training_args.include_num_input_tokens_seen in ("no", False):
        training_args.include_num_input_tokens_seen = "all"  # feeds train/tokens_per_second and train/mfu
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; avoids a warning per loader


def is_main_process(training_args):
    return training_args.process_index == 0


def default_output_dir(script_name):
    """A fresh folder under outputs/ for runs that name none."""
    return os.path.join("outputs", f"{script_name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _checkpoint_problem(path):
    """Why a checkpoint folder cannot be resumed from (None if it looks complete)."""
    state_file = os.path.join(path, "trainer_state.json")
    try:
        with open(state_file, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return "trainer_state.json is missing or truncated"
    names = os.listdir(path)
    if not any(n.endswith((".safetensors", ".bin")) and n != "training_args.bin" for n in names):
        return "no model weights"
    for name in names:
        file = os.path.join(path, name)
        if name.endswith(".safetensors"):
            with open(file, "rb") as f:
                header = f.read(8)
                if len(header) < 8:
                    return f"{name} is truncated"
                header_len = int.from_bytes(header, "little")
                try:
                    meta = json.loads(f.read(header_len))
                except ValueError:
                    return f"{name} is truncated"
            data_end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
            if os.path.getsize(file) < 8 + header_len + data_end:
                return f"{name} is truncated"
        elif name.endswith((".pt", ".pth", ".bin")) and not zipfile.is_zipfile(file):  # torch.save writes zip files
            return f"{name} is truncated"
    return None


def find_resume_checkpoint(output_dir):
    """The newest complete checkpoint in output_dir; incomplete ones are skipped with a warning."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        ((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name))), reverse=True
    )
    for _, name in steps:
        path = os.path.join(output_dir, name)
        problem = _checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping incomplete checkpoint %s: %s", path, problem)
    return None


def prepare_output_dir(training_args, data_args, script_name, config=None):
    """Check output_dir and decide what to resume from. Returns the checkpoint path or None.

    Writes run_info.json (command line and every setting, tokens hidden) into output_dir.
    Rules: a folder holding files we did not write is refused (we never overwrite someone's work);
    a rerun resumes from the newest complete checkpoint unless --overwrite_output_dir; an explicit
    --resume_from_checkpoint wins. Nothing is ever deleted here.
    """
    out = training_args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out!r} is a file; give a folder path")
    # A sweep trial's own folder (sweep.py sets SWEEP_TRIAL_DIR) holds the agent's command, log and metrics files.
    trial_dir = os.environ.get("SWEEP_TRIAL_DIR")
    agents_folder = bool(trial_dir) and os.path.realpath(out) == os.path.realpath(trial_dir)
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, RUN_MARKER)) \
            and not agents_folder:
        raise UserError(
            f"--output_dir {out!r} holds files this script did not write; choose an empty or new --output_dir"
        )
    explicit = training_args.resume_from_checkpoint
    if explicit:
        if not os.path.isdir(explicit):
            raise UserError(f"--resume_from_checkpoint {explicit!r} is not a folder; give a checkpoint-N folder")
        problem = _checkpoint_problem(explicit)
        if problem:
            raise UserError(f"--resume_from_checkpoint {explicit!r} is incomplete ({problem}); pick another checkpoint")
        checkpoint = explicit
    elif data_args.overwrite_output_dir or not training_args.do_train:
        checkpoint = None
    else:
        checkpoint = find_resume_checkpoint(out)
        if checkpoint:
            logger.info("Resuming from %s (pass --overwrite_output_dir to start fresh)", checkpoint)
    if is_main_process(training_args):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, RUN_MARKER), "w", encoding="utf-8") as f:
            info = {"script": script_name, "argv": _redacted(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "config": config or {}}
            json.dump(info, f, indent=2, default=str)
    return checkpoint


def _redacted(argv):
    """argv with token values hidden, so secrets never land in files."""
    out, hide_next = [], False
    for item in argv:
        if hide_next:
            out.append("<hidden>")
            hide_next = False
            continue
        name = item.lstrip("-").split("=")[0]
        if item.startswith("--") and name in ("token", "hub_token"):
            if "=" in item:
                out.append(f"--{name}=<hidden>")
            else:
                out.append(item)
                hide_next = True
        else:
            out.append(item)
    return out


# ---------------------------------------------------------------------------------------------------
# Throughput and MFU
# ---------------------------------------------------------------------------------------------------

def measure_peak_flops(dtype=torch.float32, size=2048, seconds=1.0, device="cpu"):
    """Matrix-multiply throughput (FLOP/s) of this machine: the physical limit MFU is measured against.

    The better of two layouts, half the time each: `x @ w.T` (nn.Linear's forward) and `x.T @ w` (its weight
    gradient). Which one a BLAS runs fastest depends on the machine (on a 2-core AVX2 EPYC: 101 vs 138 GFLOP/s
    in fp32, benchmarks/RESULTS.md section 1). Never `a @ b` with both row-major: CPUs without bf16 matrix
    units run that up to 40x slower in bf16, a rate below what training reaches. On such a CPU a bf16 product
    is timed the way the scripts compute it there (bf16_linears_through_fp32): bf16 operands, fp32 multiply.
    """
    generator = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG: runs stay reproducible
    a = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    b = torch.randn(size, size, dtype=dtype, device=device, generator=generator)
    matmul = _bf16_matmul_through_fp32() if bf16_goes_through_fp32(dtype, device) else torch.matmul
    best = 0.0
    for left, right in ((a, b.t()), (a.t(), b)):
        matmul(left, right)  # warm-up: thread pool start, kernel selection
        if device != "cpu":
            torch.cuda.synchronize()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            matmul(left, right)
            runs += 1
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * runs / (time.perf_counter() - start))
    return best


def _bf16_matmul_through_fp32():
    """bf16 @ bf16 -> bf16 through the fp32 GEMM, into buffers kept between calls: the rate the scripts' route
    (bf16_linears_through_fp32) reaches once the allocator reuses memory (keep_freed_memory_for_reuse)."""
    buffers = {}

    def matmul(left, right):
        key = (left.shape, left.stride(), right.shape, right.stride())
        if key not in buffers:
            out = torch.empty(left.shape[0], right.shape[1])
            buffers[key] = (torch.empty_like(left, dtype=torch.float32), torch.empty_like(right, dtype=torch.float32),
                            out, torch.empty_like(out, dtype=torch.bfloat16))
        left32, right32, out32, out16 = buffers[key]
        left32.copy_(left)
        right32.copy_(right)
        torch.matmul(left32, right32, out=out32)
        return out16.copy_(out32)

    return matmul


def cached_peak_flops(dtype, device="cpu"):
    """The best matrix-multiply rate this machine has shown, remembered per machine, thread count, dtype and
    torch version. Every call measures again briefly (0.3 s) and keeps the higher of that and the remembered
    value: a measurement taken while other jobs held the cores reads low, and an MFU divided by it would read
    high (above 100% even), so the figure may only go up as quieter moments are seen."""
    from data_utils import cache_root

    cpu = platform.processor() or platform.machine()
    if device != "cpu":
        cpu = torch.cuda.get_device_name()
    route = "|bf16 via fp32" if bf16_goes_through_fp32(dtype, device) else ""
    key = f"{cpu}|{torch.get_num_threads()}|{dtype}|{torch.__version__}|{device}|x@w.T,x.T@w{route}"  # see measure_peak_flops
    path = os.path.join(cache_root(), "peak_flops.json")
    try:
        with open(path, encoding="utf-8") as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if key in known:
        measured = measure_peak_flops(dtype, size=1024, seconds=0.3, device=device)
    else:
        measured = measure_peak_flops(dtype, device=device)
    if measured > known.get(key, 0.0):
        known[key] = measured
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"  # the ranks of a multi-process run measure at once: never a torn file
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(known, f, indent=1)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache: use the figure without remembering it
    return known[key]


def _numel(param):
    # Under DeepSpeed ZeRO-3 a rank holds an empty placeholder; the full size is kept in ds_numel.
    return getattr(param, "ds_numel", None) or param.numel()


def transformer_flops_per_token(model, seq_len, head_fraction=1.0):
    """Training FLOPs per token: 6 x (non-embedding weights) for forward+backward matmuls, plus
    12 x layers x width x seq_len for attention scores and values (Kaplan et al. 2020, Table 1; PaLM,
    Chowdhery et al. 2022, App. B), plus the output projection at the share of positions where it runs.
    """
    config = model.config
    embedding_params = sum(_numel(p) for n, p in model.named_parameters() if "embed" in n or "shared" in n)
    body_params = sum(_numel(p) for p in model.parameters()) - embedding_params
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model")
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 0) + getattr(config, "num_decoder_layers", 0)
    vocab = config.vocab_size
    return 6 * body_params + 12 * layers * hidden * seq_len + 6 * hidden * vocab * head_fraction


def encoder_decoder_flops_per_token(model, input_length, target_length):
    """Training FLOPs of an encoder-decoder (T5) per encoder input token, the token the Trainer counts.

    One example of `input_length` encoder and `target_length` decoder tokens costs, with the terms of
    transformer_flops_per_token: 6 x weights x tokens for each stack; 12 x attention width x keys per query
    and layer (encoder self-attention over the input, decoder self-attention over the targets plus
    cross-attention over the input); the output projection at the target positions. That total is divided
    by input_length. transformer_flops_per_token does not fit T5: it runs every token through both stacks,
    and T5Config maps num_hidden_layers to the encoder's layers only.
    """
    config = model.config

    def weights(stack):  # embeddings are lookups, not matmuls
        return sum(_numel(p) for name, p in stack.named_parameters() if "embed" not in name)

    n, t = input_length, target_length
    width = getattr(config, "num_heads", 0) * getattr(config, "d_kv", 0) or config.d_model
    enc_layers = getattr(config, "num_layers", None) or config.encoder_layers
    dec_layers = getattr(config, "num_decoder_layers", None) or config.decoder_layers
    matmuls = 6 * (weights(model.get_encoder()) * n + weights(model.get_decoder()) * t)
    attention = 12 * width * (enc_layers * n * n + dec_layers * t * (t + n))
    return (matmuls + attention + 6 * config.d_model * config.vocab_size * t) / n


class ThroughputCallback(TrainerCallback):
    """Adds train/tokens_per_second and train/mfu to every training log, and peak memory at the end.

    Tokens are those the Trainer counted (`include_num_input_tokens_seen`), so the figure is exact
    under gradient accumulation and multiple processes.

    Also train/seconds_to_first_step, once, with the first training log: seconds from the start of the
    process to the end of its first optimizer step (imports, data and tokenizer loading or building,
    model set-up, one step). It is the fixed cost every sweep trial pays, so it is printed as well.
    """

    def __init__(self, flops_per_token=None, peak_flops=None):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._last = None
        self._seconds_to_first_step = None  # measured at the first step, waiting for the next log
        self._saw_first_step = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen or 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self._saw_first_step:
            return
        self._saw_first_step = True
        import psutil  # comes with accelerate; the process start time, not the import of this module

        seconds = time.time() - psutil.Process().create_time()
        self._seconds_to_first_step = round(seconds, 2)
        if state.is_world_process_zero:
            logger.info("First training step done %.1f s after the process started", seconds)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._last is None:
            return
        added = {}
        now, tokens = time.perf_counter(), state.num_input_tokens_seen or 0
        seconds = now - self._last[0]
        if seconds > 0 and tokens > self._last[1]:
            tokens_per_second = (tokens - self._last[1]) / seconds
            added["tokens_per_second"] = round(tokens_per_second, 1)
            if self.flops_per_token and self.peak_flops:
                # The token count is summed over all processes, the peak is one device's.
                peak = self.peak_flops * args.world_size
                added["mfu"] = round(tokens_per_second * self.flops_per_token / peak, 4)
        if self._seconds_to_first_step is not None:
            added["seconds_to_first_step"] = self._seconds_to_first_step
            self._seconds_to_first_step = None
        logs.update(added)
        # The Trainer put its copy of `logs` into the log history before calling callbacks; without this
        # trainer_state.json would lack the figures that W&B and the console show.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)
        self._last = (now, tokens)


def keep_freed_memory_for_reuse():
    """Make glibc's malloc keep memory that a CPU training step frees, for the next step to reuse.

    A step frees and re-allocates the same large tensors every time (activations, the output layer's logits,
    gradients). By default glibc serves each large block with its own mmap and unmaps it when freed, and
    trims free memory off its heap, so every step faulted those tensors back in as fresh zeroed pages:
    ~90,000 page faults per BERT-mini step, over half of the process's kernel time (benchmarks/RESULTS.md,
    "Fixes tried"). With mmap and trimming off the heap keeps them; the process then holds its peak heap
    until it exits. Left alone when GLIBC_TUNABLES or a MALLOC_* variable is set (your setting wins) and
    on C libraries other than glibc. Returns True if it changed the settings.
    """
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: other C libraries may lack or ignore these settings
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>; a trim threshold of -1 turns trimming off
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def peak_memory_mb():
    """Peak GPU memory allocated by torch, or on a CPU the process's peak resident memory, in MB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # Linux's VmHWM is this program's own peak. ru_maxrss is not: a process started by a large one (a
    # benchmark, a notebook) keeps the parent's RSS from before its exec as its maximum.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def wandb_style(logs, step):
    """Trainer log keys as W&B shows them: eval_loss -> eval/loss, loss -> train/loss."""
    record = {}
    for key, value in logs.items():
        for prefix in ("eval", "test"):
            if key.startswith(prefix + "_"):
                record[f"{prefix}/{key[len(prefix) + 1:]}"] = value
                break
        else:
            record[f"train/{key}"] = value
    record["train/global_step"] = step
    return record


class SweepMetricsCallback(TrainerCallback):
    """When the offline sweep agent sets SWEEP_METRICS_FILE, append every logged record there as one
    JSON line with W&B names, so the agent can prune weak trials and read the final metric."""

    def __init__(self, path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            record = {k: v for k, v in wandb_style(logs, state.global_step).items() if isinstance(v, (int, float, str))}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class RunConfigCallback(TrainerCallback):
    """Put all our dataclasses into the W&B run config, not only TrainingArguments. Values W&B already
    holds (a sweep agent's parameters) win: setdefaults only fills what is missing."""

    def __init__(self, config):
        self.config = config

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:
                wandb.config.setdefaults(self.config)


def match_loss_scaling(trainer):
    """Tell the Trainer whether the model's loss divides by the `num_items_in_batch` it is given.

    transformers assumes so for every model whose forward takes **kwargs: it then multiplies the loss by
    the number of processes and skips the division by gradient-accumulation steps. BERT's and T5's heads
    return a plain mean and ignore the count, so with N processes their losses, gradients, eval loss and
    perplexity all came out N times too large. Only a forward that names the argument (our sparse MLM
    head) keeps the count; other models get plain means, which DDP averages like a single-process run.
    """
    forward = trainer.accelerator.unwrap_model(trainer.model).forward
    if "num_items_in_batch" not in inspect.signature(forward).parameters:
        trainer.model_accepts_loss_kwargs = False


def add_callbacks(trainer, config, flops_per_token=None, peak_flops=None):
    """Attach our callbacks (the throughput one first, so its numbers reach W&B and the console), fit the
    Trainer's loss scaling to the model (match_loss_scaling) and, for bf16 on a CPU without bf16 matrix units,
    route the model's bf16 products through fp32 (bf16_through_fp32): every script calls this before
    training or evaluating."""
    match_loss_scaling(trainer)
    if bf16_goes_through_fp32(compute_dtype(trainer.args), device_kind(trainer.args)):
        linears, attention = bf16_through_fp32(trainer.accelerator.unwrap_model(trainer.model))
        logger.warning("bf16 on a CPU without bf16 matrix units: %d linear layers%s compute their bf16 products in "
                       "fp32 (bf16 rounding, fp32 speed); torch's own bf16 kernels are 5-40x slower here", linears,
                       " and the attention" if attention else "")
    trainer.callback_handler.callbacks.insert(0, ThroughputCallback(flops_per_token, peak_flops))
    trainer.add_callback(RunConfigCallback(config))
    if os.environ.get("SWEEP_METRICS_FILE"):
        trainer.add_callback(SweepMetricsCallback(os.environ["SWEEP_METRICS_FILE"]))


def log_and_save(trainer, split, metrics):
    """Print metrics, write <split>_results.json and merge them into all_results.json (as HF does)."""
    trainer.log_metrics(split, metrics)
    trainer.save_metrics(split, metrics)
    if split == "train":
        trainer.save_state()


def run_config(*dataclass_objects):
    return to_config_dict(*dataclass_objects)


def perplexity(loss):
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# ---------------------------------------------------------------------------------------------------
# --load_best_model_at_end: every checkpoint must fall on an evaluation
# ---------------------------------------------------------------------------------------------------

def check_best_model_settings(training_args):
    """The best model is a saved checkpoint whose evaluation was the best, so saves must land on
    evaluations. Raise UserError naming the fix when they cannot; call it before loading any data.

    Intervals below 1 are fractions of the total steps: two fractions are compared as a ratio; a fraction
    beside a step count is resolved to steps when --max_steps gives the total (else the total depends on
    the data, so the error asks for one kind for both).
    """
    args = training_args
    if not args.load_best_model_at_end or args.save_strategy == "best":
        return
    eval_strategy, save_strategy = (getattr(s, "value", s) for s in (args.eval_strategy, args.save_strategy))
    if eval_strategy == "no":
        raise UserError("--load_best_model_at_end needs evaluations during training; add --eval_strategy epoch "
                        "--save_strategy epoch (or steps, with --eval_steps and --save_steps)")
    if save_strategy != eval_strategy:
        raise UserError(f"--load_best_model_at_end needs a checkpoint at every evaluation, but --eval_strategy is "
                        f"{eval_strategy} and --save_strategy {save_strategy}; pass --save_strategy {eval_strategy}")
    if eval_strategy != "steps":
        return
    eval_steps, save_steps = args.eval_steps or args.logging_steps, args.save_steps
    if (eval_steps < 1) != (save_steps < 1):
        if args.max_steps <= 0:
            raise UserError(f"--eval_steps {eval_steps:g} and --save_steps {save_steps:g} mix a fraction of the run "
                            "with a step count; give both as fractions (e.g. --eval_steps 0.1 --save_steps 0.2) "
                            "or both as step counts")
        # Rounded up, as the Trainer resolves fractions.
        eval_steps, save_steps = (math.ceil(s * args.max_steps) if s < 1 else int(s) for s in (eval_steps, save_steps))
        args.eval_steps, args.save_steps = eval_steps, save_steps
    multiple = save_steps / eval_steps
    if multiple < 0.999999 or abs(multiple - round(multiple)) > 1e-6:
        raise UserError(f"--load_best_model_at_end needs --save_steps to be a multiple of --eval_steps (got "
                        f"{save_steps:g} and {eval_steps:g}); pass --save_steps {eval_steps * max(1, round(multiple)):g}")


class SaveOnEvalCallback(TrainerCallback):
    """Two fractions of the run are rounded up separately by the Trainer (25 steps: ceil(2.5) = 3 for
    --eval_steps 0.1 but ceil(7.5) = 8 for --save_steps 0.3), so saves could miss evaluations; this makes
    the save interval that exact multiple of the resolved evaluation interval."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.load_best_model_at_end and args.save_strategy == "steps" and 0 < args.save_steps < 1:
            eval_steps = args.eval_steps or args.logging_steps
            if 0 < eval_steps < 1 and state.eval_steps:
                state.save_steps = round(args.save_steps / eval_steps) * state.eval_steps


def parse_args_checking_best_model(dataclass_types, argv):
    """arguments.parse_args, then check_best_model_settings. transformers' own check of --load_best_model_at_end
    names no fix and rejects fractions such as 0.3 / 0.1 (a float remainder), so its error is set aside and
    the settings are judged here. TrainingArguments must be among the dataclasses."""
    from arguments import parse_args

    try:
        outputs = parse_args(dataclass_types, argv)
    except UserError as err:
        if "load_best_model_at_end" not in str(err):
            raise
        outputs = parse_args(dataclass_types, list(argv) + ["--load_best_model_at_end=false"])
        next(o for o in outputs if isinstance(o, transformers.TrainingArguments)).load_best_model_at_end = True
    check_best_model_settings(next(o for o in outputs if isinstance(o, transformers.TrainingArguments)))
    return outputs


# ---------------------------------------------------------------------------------------------------
# Classification heads: a checkpoint's own label names
# ---------------------------------------------------------------------------------------------------

def model_label_names(config):
    """The checkpoint's label names by class id, or None if it has only the placeholders LABEL_0, LABEL_1, ..."""
    names = [str(config.id2label[i]) for i in sorted(config.id2label)] if config.id2label else []
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def align_with_model_labels(names, config, must_match):
    """The model's class id for each of `names`. As in Hugging Face's examples, a checkpoint whose labels have
    the same names (any case) keeps its order; other names are ignored with a warning, or, when the model
    is only evaluated (`must_match`), raise UserError."""
    existing = model_label_names(config)
    if existing and sorted(n.lower() for n in existing) == sorted(n.lower() for n in names):
        return [[n.lower() for n in existing].index(name.lower()) for name in names]
    if existing and must_match:
        raise UserError(f"the model's labels ({', '.join(existing)}) are not the data's ({', '.join(names)}); "
                        "evaluate on data with the model's labels, or fine-tune first (--do_train)")
    if existing:
        logger.warning("Ignoring the model's labels %s: they are not the data's %s", existing, names)
    return list(range(len(names)))


# ---------------------------------------------------------------------------------------------------
# Masked-LM head only where there are labels
# ---------------------------------------------------------------------------------------------------

def enable_sparse_mlm_head(model):
    """Compute the MLM prediction head only at masked positions (as crammed BERT and MosaicBERT do).

    With a 30k vocabulary the output layer costs more than the whole encoder, yet only ~15% of the
    positions carry a label. The weights and the saved format are untouched: only this instance's
    forward changes. In evaluation the returned `logits` are the argmax token ids at the labelled
    positions (-100 elsewhere), so metrics never hold full-vocabulary logits; a training step returns the
    loss alone; without labels the model returns ordinary full logits. Returns False (and changes nothing) for models whose head
    is not one module beside the encoder.
    """
    from transformers.modeling_outputs import MaskedLMOutput

    base = getattr(model, model.base_model_prefix, None)
    heads = [module for name, module in model.named_children() if name != model.base_model_prefix]
    if base is None or len(heads) != 1:
        return False
    head = heads[0]

    def forward(input_ids=None, attention_mask=None, token_type_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        encoder_kwargs = {"attention_mask": attention_mask, **kwargs}
        if token_type_ids is not None:
            encoder_kwargs["token_type_ids"] = token_type_ids
        hidden = base(input_ids=input_ids, **encoder_kwargs)[0]
        if labels is None:
            return MaskedLMOutput(logits=head(hidden))
        selected = labels != -100
        logits = head(hidden[selected]).float()  # (masked tokens, vocab); float32 for a stable softmax
        targets = labels[selected]
        if num_items_in_batch is not None:  # gradient accumulation: normalise by the tokens of the whole step
            loss = F.cross_entropy(logits, targets, reduction="sum") / num_items_in_batch
        else:
            loss = F.cross_entropy(logits, targets)
        if model.training:  # the Trainer reads only the loss of a training step; an argmax is ~1.5% of a CPU step
            return MaskedLMOutput(loss=loss)
        predictions = torch.full_like(labels, -100)
        predictions[selected] = logits.argmax(-1)
        return MaskedLMOutput(loss=loss, logits=predictions)

    model.forward = forward
    return True


# ---------------------------------------------------------------------------------------------------
# bf16 on CPUs without bf16 matrix units
# ---------------------------------------------------------------------------------------------------

def native_bf16_matmul(device="cpu"):
    """Whether torch multiplies bf16 matrices with a fast kernel here: on GPUs, and on CPUs where oneDNN takes
    bf16 (AVX512 or AMX). Elsewhere ATen's portable bf16 GEMM runs, 6-40x below the fp32 rate (RESULTS.md)."""
    if device != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_goes_through_fp32(dtype, device="cpu"):
    """Whether the scripts compute this dtype's products through fp32 here: bf16 where torch has no fast bf16
    GEMM (bf16_linears_through_fp32). The peak that MFU divides by is timed the same way."""
    return dtype == torch.bfloat16 and not native_bf16_matmul(device)


class _BF16LinearThroughFP32(torch.autograd.Function):
    """A bf16 linear layer whose products run in fp32: operands rounded to bf16, multiplied and accumulated in
    fp32, results rounded to bf16 (what a bf16 GEMM with fp32 accumulation gives, on a GPU too). Saves the
    bf16 operands for backward, as autocast does; gradients come back rounded to bf16 in their inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        bf16 = torch.bfloat16
        x16, w16 = x.to(bf16), weight.to(bf16)
        ctx.save_for_backward(x16, w16)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        b32 = None if bias is None else bias.to(bf16).float()
        return F.linear(x16.float(), w16.float(), b32).to(bf16)

    @staticmethod
    def backward(ctx, grad):
        bf16 = torch.bfloat16
        x16, w16 = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad = grad.to(bf16).float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ w16.float()).to(bf16).to(x_dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (rows.t() @ x16.reshape(-1, x16.shape[-1]).float()).to(bf16).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0).to(bf16).to(b_dtype)
        return grad_x, grad_w, grad_b


def _linear_forward(self, x):
    """nn.Linear.forward, with bf16 products (under bf16 autocast, or on bf16 weights) taken through fp32."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            return _BF16LinearThroughFP32.apply(x, self.weight, self.bias)
    if x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 and x.device.type == "cpu":
        return _BF16LinearThroughFP32.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def bf16_linears_through_fp32(model):
    """Make the model's nn.Linear layers compute bf16 products in fp32, for bf16 training on a CPU without bf16
    matrix units. There torch's bf16 GEMM is ATen's portable loop: 22 GFLOP/s at best against 138 in fp32 on a
    2-core AVX2 EPYC, and 0.3-0.9 GFLOP/s for `grad @ W`, a Linear's input gradient; a BERT-mini bf16 step took
    24x the fp32 step (benchmarks/RESULTS.md). The rounding stays bf16's (bf16 operands and results, fp32
    accumulation), so a run keeps bf16 numerics at about the fp32 speed. Weights and the saved format are
    untouched: only these instances' forward changes. Returns the number of layers changed."""
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:  # subclasses may compute differently
            module.forward = _linear_forward.__get__(module)
            changed += 1
    return changed


def _switch_to_sdpa_variant(model, name, function):
    """Make a model that uses transformers' SDPA attention run `function` (which takes SDPA's inputs) instead,
    registered under `name` with transformers' AttentionInterface together with SDPA's mask function: without the
    latter, transformers builds no attention mask for an unknown name, and padding would be attended to. Other
    attention implementations are left alone, and the saved config does not change. Returns True if it changed
    the model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        model.set_attn_implementation(name)
    except (ValueError, KeyError, AttributeError):  # a model that takes no custom attention function
        return False
    return model.config._attn_implementation == name


SDPA_THROUGH_FP32 = "sdpa_bf16_through_fp32"  # the name it is registered under with transformers' AttentionInterface


def _sdpa_bf16_through_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with bf16 inputs on a CPU computed in fp32 and the result rounded to bf16
    (what torch's bf16 kernels compute inside, in fp32). The backward of torch's fused CPU attention in bf16
    took 5x its fp32 time here: 40 ms against 8 for a T5 cross-attention of 114 queries over 512 keys."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.dtype != torch.bfloat16 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def up(tensor):
        return tensor.float() if torch.is_tensor(tensor) and tensor.is_floating_point() else tensor

    if "position_bias" in kwargs:  # T5's relative position bias, added to the scores
        kwargs["position_bias"] = up(kwargs["position_bias"])
    with torch.autocast("cpu", enabled=False):
        output, weights = sdpa_attention_forward(module, up(query), up(key), up(value), up(attention_mask), **kwargs)
    return output.to(torch.bfloat16), weights


def bf16_attention_through_fp32(model):
    """Make a model that uses transformers' SDPA attention compute its bf16 attention in fp32 on a CPU (see
    _sdpa_bf16_through_fp32). Returns True if it changed the model (see _switch_to_sdpa_variant)."""
    return _switch_to_sdpa_variant(model, SDPA_THROUGH_FP32, _sdpa_bf16_through_fp32)


def bf16_through_fp32(model):
    """Both routes for bf16 on a CPU without bf16 matrix units: linear layers and SDPA attention. Returns the
    number of linear layers changed and whether the attention was."""
    return bf16_linears_through_fp32(model), bf16_attention_through_fp32(model)


# ---------------------------------------------------------------------------------------------------
# Dropout on a CPU
# ---------------------------------------------------------------------------------------------------

DROPOUT_BITS = 15  # a keep mask from 15-bit random numbers: p is rounded to a multiple of 1/32768


def _keep_mask(shape, p):
    """(keep, scale) for dropout with probability p: a bool mask from the global torch generator (so seeds and
    checkpoints reproduce it) and 1 / the share it keeps. torch's CPU dropout draws a Bernoulli number per
    element in its input's dtype, 12 ms for 2M elements on a 2-core EPYC (RESULTS.md); one 32-bit random_ draw
    per two elements, 15 bits each, gives the mask in a quarter of that."""
    levels = 1 << DROPOUT_BITS
    dropped = round(p * levels)  # p = 0.1 drops with probability 0.100006
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int32).random_().view(torch.int16)[:n].view(shape)
    return (bits & (levels - 1)) >= dropped, levels / (levels - dropped)


class _CPUDropout(torch.autograd.Function):
    """Dropout that saves its keep mask (one byte per element) for backward instead of a scaled noise tensor
    in the input's dtype."""

    @staticmethod
    def forward(ctx, x, p):
        keep, scale = _keep_mask(x.shape, p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def cpu_dropout(x, p, training=True):
    """F.dropout for CPU tensors (see _keep_mask); elsewhere, and outside training, torch's own."""
    if not training or p == 0.0 or x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, training)
    if p >= 1.0:
        return x * 0.0
    return _CPUDropout.apply(x, p)


def _dropout_forward(self, x):
    return cpu_dropout(x, self.p, self.training)


CPU_DROPOUT_ATTENTION = "sdpa_cpu_dropout"  # registered with transformers' AttentionInterface


def _sdpa_cpu_dropout(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      position_bias=None, **kwargs):
    """transformers' SDPA attention, except in training on a CPU with attention dropout: there torch's SDPA
    cannot use its fused kernel (it takes no dropout) and runs separate ops with torch's dropout; this runs
    softmax(q k^T x scale + mask) with cpu_dropout, then x v. Grouped key/value heads, a cache and other options
    take SDPA as before."""
    from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward

    causal = attention_mask is None and query.shape[2] > 1 and (  # a causal mask left to the kernel, as SDPA reads it
        is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if (not module.training or dropout == 0.0 or query.device.type != "cpu" or query.shape[1] != key.shape[1]
            or (causal and key.shape[2] != query.shape[2])
            or any(v is not None and v is not False for v in kwargs.values())):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    if position_bias is not None:  # T5: the relative position bias joins the mask, as SDPA takes it
        attention_mask = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
    elif causal:
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scale if scale != 1.0 else query, key.transpose(-1, -2))  # q: 1/(keys) the size
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # True: may attend
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    # In the scores' dtype: torch's CPU softmax sums bf16 in fp32 anyway (the same weights as an fp32 softmax
    # rounded to bf16), at a third of the time of converting to fp32 and back.
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    output = torch.matmul(cpu_dropout(weights, dropout), value)
    return output.transpose(1, 2).contiguous(), None


def use_cpu_dropout(model):
    """Make the model's dropout draw its masks the fast way on a CPU (cpu_dropout): every nn.Dropout module, and
    the attention's dropout where the model uses transformers' SDPA attention. The same dropout in law (p rounded
    to 1/32768), not the same masks as torch's for a seed. Weights, the saved config and GPU runs are untouched.
    Returns (modules changed, whether the attention was)."""
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Dropout and module.p > 0:  # subclasses may do more
            module.forward = _dropout_forward.__get__(module)
            changed += 1
    return changed, _switch_to_sdpa_variant(model, CPU_DROPOUT_ATTENTION, _sdpa_cpu_dropout)


def compute_dtype(training_args):
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def device_kind(training_args):
    return "cpu" if training_args.use_cpu or not torch.cuda.is_available() else "cuda"


# ---------------------------------------------------------------------------------------------------
# Preemption and divergence: nothing is lost when a run is interrupted or blows up
# ---------------------------------------------------------------------------------------------------

STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)


class PreemptionCallback(TrainerCallback):
    """SIGTERM, SIGINT or SIGUSR1 (what Slurm sends before preemption): finish the current optimizer
    step, save a checkpoint, stop. A second signal exits at once. Under several processes the flag is
    shared, so every rank stops at the same step and the collective checkpoint save cannot deadlock."""

    # One stop request often arrives twice within milliseconds: Slurm signals every process of a job step
    # (the workers too), and torchrun forwards the signal it got to the workers. Such an echo is no
    # "second signal", or no multi-process run would ever write its checkpoint.
    REPEAT_WINDOW_SECONDS = 2.0

    def __init__(self):
        self.signal_number = None
        self._stop_time = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal_number is not None:  # second signal: the user means it
            if time.monotonic() - self._stop_time < self.REPEAT_WINDOW_SECONDS:
                return
            print(f"\nsignal {signum} again: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal_number, self._stop_time = signum, time.monotonic()
        print(f"\nsignal {signum}: finishing this step, then saving a checkpoint (send again to exit at once)",
              file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # signal handlers only work there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.signal_number is not None
        if args.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([float(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.signal_number is None:
                self.signal_number, self._stop_time = signal.SIGTERM, time.monotonic()  # another rank was signalled
        if stop:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class BatchSeedCallback(TrainerCallback):
    """Tell a collator with per-batch seeds (data_utils.BatchSeeds) how many batches came before this
    epoch's first one, so masks depend only on the batch number, also after a resume."""

    def __init__(self, batch_seeds):
        self.batch_seeds = batch_seeds

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.batch_seeds.restart(state.global_step * args.gradient_accumulation_steps)


class NonFiniteLoss(RuntimeError):
    pass


def _guard_loss(trainer):
    """Check each step's loss before the optimizer step can save it into a checkpoint."""
    original = trainer.training_step

    def training_step(*args, **kwargs):
        loss = original(*args, **kwargs)
        if not torch.isfinite(loss).all():
            raise NonFiniteLoss(f"loss became {loss.item()} at step {trainer.state.global_step + 1}")
        return loss

    trainer.training_step = training_step


def train(trainer, resume_from_checkpoint=None):
    """trainer.train() with preemption handling and a guard against NaN/inf loss.

    On a stop signal: the checkpoint path is printed and the process exits with 128 + signal number,
    so a scheduler (Slurm --requeue) can rerun the same command, which resumes from it.
    """
    preemption = PreemptionCallback()
    trainer.add_callback(preemption)
    if hasattr(trainer.data_collator, "batch_seeds"):
        trainer.add_callback(BatchSeedCallback(trainer.data_collator.batch_seeds))
    _guard_loss(trainer)
    if device_kind(trainer.args) == "cpu":
        if keep_freed_memory_for_reuse():
            logger.info("CPU training: malloc keeps freed memory for reuse (a MALLOC_* or GLIBC_TUNABLES variable "
                        "in the environment leaves glibc's settings alone)")
        modules, attention = use_cpu_dropout(trainer.accelerator.unwrap_model(trainer.model))
        if modules or attention:
            logger.info("CPU training: %d dropout layers%s draw their masks from 15-bit random numbers (faster "
                        "than torch's per-element Bernoulli draws)", modules, " and the attention" if attention else "")
    try:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except NonFiniteLoss as err:
        last = find_resume_checkpoint(trainer.args.output_dir)
        hint = "lower --learning_rate (or raise --warmup_steps), or set --max_grad_norm 1.0"
        if trainer.args.fp16:
            hint += "; use --bf16 instead of --fp16 (T5 overflows in fp16)"
        raise UserError(f"{err}; stopped. Last good checkpoint: {last or 'none'}. Try: {hint}") from None
    if preemption.signal_number is not None:
        path = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
        if trainer.is_world_process_zero():
            print(f"\nInterrupted by signal {preemption.signal_number} at step {trainer.state.global_step}. "
                  f"Checkpoint: {path}\nRun the same command again to resume.", file=sys.stderr, flush=True)
        # Rank 0 may still be writing the checkpoint; a rank that exits non-zero before it is done makes
        # torchrun terminate the others, rank 0 included.
        trainer.accelerator.wait_for_everyone()
        raise SystemExit(128 + preemption.signal_number)
    return result
