"""Tokens per second, model FLOPs utilization (MFU) and peak memory for the three scripts: FLOPs per token of an
encoder or an encoder-decoder, the device's peak (a table of published GPU peaks, or a CPU's matrix multiply
measured once per machine), the callback that logs train/tokens_per_second and train/mfu, and peak_memory_mb.
"""

import json
import logging
import os
import platform
import resource
import time

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


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
    return 6 * body_params + 12 * layers * hidden * seq_len + 6 * hidden * config.vocab_size * head_fraction


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


def cpu_has_bf16_matmul():
    """Whether torch multiplies bf16 matrices with a fast kernel on this CPU (oneDNN on AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def peak_memory_mb():
    """Peak GPU memory allocated by torch, or on a CPU the process's peak resident memory, in MB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:  # Linux's VmHWM: ru_maxrss would count the RSS a parent process had before it started this one
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# Dense peak TFLOP/s from NVIDIA's datasheets: (bf16 or fp16 on tensor cores, TF32, plain fp32). Longer names first.
GPU_PEAK_TFLOPS = {"H100 PCIe": (756, 378, 51), "H200": (989, 494, 67), "H100": (989, 494, 67), "A100": (312, 156, 19.5),
                   "L40S": (362, 183, 91.6), "V100": (125, 15.7, 15.7), "L4": (121, 60, 30.3), "T4": (65, 8.1, 8.1)}


def peak_flops(training_args, peak_tflops=None):
    """The FLOP/s that train/mfu divides by: --peak_tflops; else a known GPU's published dense peak for the run's
    dtype; else, on a CPU, a matrix multiply measured once per machine and cached. None: no MFU is logged."""
    if peak_tflops:
        return peak_tflops * 1e12
    half = training_args.bf16 or training_args.fp16
    if torch.cuda.is_available() and not training_args.use_cpu:
        name = torch.cuda.get_device_name()
        for key, (tensor, tf32, fp32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return 1e12 * (tensor if half else tf32 if training_args.tf32 else fp32)
        logger.info("No published peak for %s in throughput.GPU_PEAK_TFLOPS: pass --peak_tflops to log train/mfu", name)
        return None
    return cpu_peak_flops(torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32)


def cpu_peak_flops(dtype, size=2048, seconds=1.0):
    """Matrix-multiply FLOP/s of this CPU in `dtype` (x @ w.T, nn.Linear's product; the fastest of ~1 s of them),
    measured on the first run and remembered per CPU model, thread count, dtype and torch version in
    <cache>/peak_flops.json. Delete that file to measure again."""
    from data_utils import cache_root

    key = f"{platform.processor() or platform.machine()}|{torch.get_num_threads()}|{dtype}|{torch.__version__}"
    path = os.path.join(cache_root(), "peak_flops.json")
    try:
        with open(path, encoding="utf-8") as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if key not in known:
        generator = torch.Generator().manual_seed(0)  # leaves the global RNG alone: runs stay reproducible
        a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
        a @ b.t()  # warm-up: thread pool, kernel choice
        fastest, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            product_start = time.perf_counter()
            a @ b.t()
            fastest = min(fastest, time.perf_counter() - product_start)
        known[key] = 2 * size**3 / fastest  # the fastest product: other jobs slow some products, rarely all
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"  # ranks of a multi-process run may measure at once: never a torn file
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(known, f, indent=1)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache: use the figure without remembering it
    return known[key]


class ThroughputCallback(TrainerCallback):
    """Adds train/tokens_per_second and train/mfu to every training log; tokens are those the Trainer counted
    (`include_num_input_tokens_seen`), exact under gradient accumulation and several processes. The summary logged
    when training ends gets peak_memory_mb and loses transformers' train_tokens_per_second (one tokens/s key). Adds
    train/seconds_to_first_step once: from the process start to the end of its first optimizer step (imports,
    data, tokenizer, model set-up, one step), the fixed cost every sweep trial pays."""

    def __init__(self, flops_per_token=None, peak_flops=None):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._last = None
        self._first_step = None  # seconds, waiting for the next log; False once logged
        self._warned = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen or 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self._first_step is None:
            import psutil  # comes with accelerate

            self._first_step = round(time.time() - psutil.Process().create_time(), 2)
            if state.is_world_process_zero:
                logger.info("First training step done %.1f s after the process started", self._first_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "train_runtime" in logs:  # the summary logged when training ends
            logs.pop("train_tokens_per_second", None)  # a run-long average beside ours: one tokens/s key in W&B
            logs["peak_memory_mb"] = round(peak_memory_mb(), 1)
        if logs is None or "loss" not in logs or self._last is None:
            return
        added = {}
        now, tokens = time.perf_counter(), state.num_input_tokens_seen or 0
        if now > self._last[0] and tokens > self._last[1]:
            tokens_per_second = (tokens - self._last[1]) / (now - self._last[0])
            added["tokens_per_second"] = round(tokens_per_second, 1)
            if self.flops_per_token and self.peak_flops:  # tokens of all processes, the peak of one device
                added["mfu"] = round(tokens_per_second * self.flops_per_token / (self.peak_flops * args.world_size), 4)
                if added["mfu"] > 1 and not self._warned and state.is_world_process_zero:
                    self._warned = True
                    logger.warning("train/mfu %.2f is above 1: the peak it divides by is too low (a CPU's peak measured "
                                   "while other jobs ran?); pass --peak_tflops, or delete <cache>/peak_flops.json to "
                                   "measure again", added["mfu"])
        if self._first_step:
            added["seconds_to_first_step"], self._first_step = self._first_step, False
        logs.update(added)
        # The Trainer put its copy of `logs` into the log history before calling callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)
        self._last = (now, tokens)
