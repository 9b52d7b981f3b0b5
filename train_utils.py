"""Trainer plumbing the three scripts share: logging, run-dependent defaults, the
callbacks (tokens/s and MFU from throughput.py, W&B config, sweep metrics), clean stops on a signal, results files.

Nothing here changes a model; nothing here is a place students are expected to edit.
"""

import contextlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time

import datasets
import torch
import transformers
from transformers import TrainerCallback

import run_folder
import throughput
from arguments import UserError

logger = logging.getLogger(__name__)


def setup_logging(training_args):
    """One log format for all scripts; replicas of a multi-process run only warn."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    logging.getLogger().setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    library_level = training_args.get_process_log_level()  # --log_level; libraries stay at warning by default
    datasets.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.set_verbosity(library_level)


def finalize_training_args(training_args, given):
    """Defaults that depend on the run rather than on one flag (--help states them: arguments.TRAINING_DEFAULT_RULES;
    fixed ones are parser defaults, arguments.TRAINING_DEFAULTS). `given`: arguments.flags_given(argv)."""
    if os.environ.get("WANDB_SWEEP_ID") and "report_to" not in given and training_args.report_to in ([], ["none"], "none", None):
        training_args.report_to = ["wandb"]  # launched by `wandb agent`: the sweep needs the metrics in W&B
    # transformers turns do_eval on by itself for any --eval_strategy but "no": that alone asks for no eval-only run
    asked_eval = training_args.do_eval and ("do_eval" in given or training_args.eval_strategy == "no")
    if not (training_args.do_train or asked_eval or training_args.do_predict):
        training_args.do_train = training_args.do_eval = True  # nothing asked for: do the whole job
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; avoids a warning per loader
        if training_args.bf16 and not throughput.cpu_has_bf16_matmul() and training_args.process_index == 0:
            print("warning: --bf16 on a CPU without bf16 matrix units (AVX512-BF16 or AMX) runs several times "
                  "slower than fp32; drop --bf16 for speed", file=sys.stderr)


def wandb_style(logs, step):
    """Trainer log keys as W&B shows them: eval_loss -> eval/loss, loss -> train/loss."""
    record = {("%s/%s" % tuple(key.split("_", 1)) if key.startswith(("eval_", "test_")) else f"train/{key}"): value
              for key, value in logs.items()}
    return dict(record, **{"train/global_step": step})


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
    """Tell the Trainer whether the model's loss divides by the `num_items_in_batch` it is given. transformers
    assumes so for any forward taking **kwargs and then scales the loss by the process count; BERT's and T5's
    heads return plain means, so their losses came out N times too large on N processes."""
    forward = trainer.accelerator.unwrap_model(trainer.model).forward
    if "num_items_in_batch" not in inspect.signature(forward).parameters:
        trainer.model_accepts_loss_kwargs = False


def prepare_trainer(trainer, config, flops_per_token=None, peak=None, run_info=None):
    """Attach our callbacks (throughput first, so its figures reach W&B and the console), match the Trainer's
    loss scaling to the model (match_loss_scaling) and write run_info.json (from prepare_output_dir). Every
    script calls this before training or evaluating."""
    if run_info is not None:
        run_folder.write_run_info(trainer.args, run_info)
    match_loss_scaling(trainer)
    trainer.callback_handler.callbacks.insert(0, throughput.ThroughputCallback(flops_per_token, peak))
    trainer.add_callback(RunConfigCallback(config))
    if os.environ.get("SWEEP_METRICS_FILE"):
        trainer.add_callback(SweepMetricsCallback(os.environ["SWEEP_METRICS_FILE"]))


class IsolatedEvalTrainer(transformers.Trainer):
    """transformers' Trainer whose evaluation is kept apart from training. It leaves torch's random state as it
    was (each DataLoader draws from it when it starts) and draws the collator's masks from a stream of their own,
    from its start each time (data_utils.BatchSeeds.evaluation): the same weights always score the same, and
    evaluating during training changes no training step, so a resumed run stays exact. Its loss is the model's
    plain cross-entropy, never label-smoothed (--label_smoothing_factor is for training), so perplexity is exp
    of the eval loss."""

    def evaluate(self, *args, **kwargs):
        seeds = getattr(self.data_collator, "batch_seeds", None)
        smoother, self.label_smoother = self.label_smoother, None
        try:
            with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                with seeds.evaluation() if seeds is not None else contextlib.nullcontext():
                    return super().evaluate(*args, **kwargs)
        finally:
            self.label_smoother = smoother


def log_and_save(trainer, split, metrics):
    """Print metrics, write <split>_results.json and merge them into all_results.json (as HF does)."""
    trainer.log_metrics(split, metrics)
    trainer.save_metrics(split, metrics)
    if split == "train":
        trainer.save_state()


# Preemption and divergence: nothing is lost when a run is interrupted or blows up

STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)


class PreemptionCallback(TrainerCallback):
    """SIGTERM, SIGINT or SIGUSR1 (what Slurm sends before preemption): finish the current optimizer step, save
    a checkpoint, stop; a second signal exits at once. Under several processes the flag is shared, so every
    rank stops at the same step and the collective checkpoint save cannot deadlock."""

    # Slurm signals every process of a job step and torchrun forwards what it got: one request often arrives
    # twice within milliseconds, and such an echo is no "second signal".
    REPEAT_WINDOW_SECONDS = 2.0

    def __init__(self):
        self.signal_number, self._stop_time, self._previous = None, None, {}

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
    """The loss became NaN or inf."""


def _guard_loss(trainer):
    """Check each step's loss before the optimizer step can save it into a checkpoint."""
    original = trainer.training_step

    def training_step(*args, **kwargs):
        loss = original(*args, **kwargs)
        if not torch.isfinite(loss).all():
            raise NonFiniteLoss(f"loss became {loss.item()} at step {trainer.state.global_step + 1}")
        return loss

    trainer.training_step = training_step


def _skip_tied_weights_in_resume_warning(trainer):
    """On resume transformers warns that tied weights (BERT's output layer, T5's embeddings) are missing from the
    checkpoint, though they are saved once, under the weight they share (huggingface/transformers#27972)."""
    original = trainer._issue_warnings_after_load

    def issue_warnings_after_load(load_result):
        tied = getattr(trainer.accelerator.unwrap_model(trainer.model), "all_tied_weights_keys", None) or {}
        return original(load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied]))

    trainer._issue_warnings_after_load = issue_warnings_after_load


def train(trainer, resume_from_checkpoint=None):
    """trainer.train() that stops cleanly on a signal (PreemptionCallback; then exits with 128 + signal number, so
    a scheduler can rerun the same command to resume), stops with a hint when the loss turns NaN/inf, and does
    not warn that tied weights are missing when it resumes (_skip_tied_weights_in_resume_warning)."""
    _skip_tied_weights_in_resume_warning(trainer)
    preemption = PreemptionCallback()
    trainer.add_callback(preemption)
    if hasattr(trainer.data_collator, "batch_seeds"):
        trainer.add_callback(BatchSeedCallback(trainer.data_collator.batch_seeds))
    _guard_loss(trainer)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except NonFiniteLoss as err:
        last = run_folder.find_resume_checkpoint(trainer.args.output_dir)
        hint = "lower --learning_rate (or raise --warmup_steps), or set --max_grad_norm 1.0"
        if trainer.args.fp16:
            hint += "; use --bf16 instead of --fp16 (T5 overflows in fp16)"
        raise UserError(f"{err}; stopped. Last good checkpoint: {last or 'none'}. Try: {hint}") from None
    if preemption.signal_number is not None:
        path = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
        if trainer.is_world_process_zero():
            print(f"\nInterrupted by signal {preemption.signal_number} at step {trainer.state.global_step}. "
                  f"Checkpoint: {path}\nRun the same command again to resume.", file=sys.stderr, flush=True)
        # A rank exiting before rank 0 has written the checkpoint would make torchrun kill rank 0.
        trainer.accelerator.wait_for_everyone()
        raise SystemExit(128 + preemption.signal_number)
    return result
