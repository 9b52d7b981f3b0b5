"""The output folder of a run: where it is (outputs/<script>-<hash> unless --output_dir), whose files it holds,
which checkpoint a rerun resumes from, and whether the same run already finished there. Nothing is ever deleted.
"""

import hashlib
import json
import logging
import os
import re
import sys
import time
import zipfile

from arguments import UserError

logger = logging.getLogger(__name__)

RUN_MARKER = "run_info.json"  # written into every output_dir we use: tells our files from a user's
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name))),
                   reverse=True)
    for _, name in steps:
        path = os.path.join(output_dir, name)
        problem = _checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping incomplete checkpoint %s: %s", path, problem)
    return None


# Settings that change where or how a run reports, not what it computes (local_rank: each process's own): left
# out of the default folder's name and of the check that a finished run is the same run.
NOT_DEFINING = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to", "run_name", "project",
                "logging_steps", "logging_strategy", "logging_first_step", "log_level", "log_level_replica",
                "disable_tqdm", "save_steps", "save_strategy", "save_total_limit", "eval_steps", "eval_on_start",
                "dataloader_num_workers", "preprocessing_num_workers", "overwrite_cache", "cache_dir",
                "push_to_hub", "hub_model_id", "hub_token", "token", "peak_tflops", "ddp_timeout", "local_rank"}


def default_output_dir(script_name, config, given):
    """Where a run without --output_dir writes: the sweep agent's trial folder (SWEEP_TRIAL_DIR), else
    outputs/<script>-<hash of the settings the user gave that define the run>, so running the same command
    again finds the same folder and resumes. Under `wandb agent`, each W&B run id gets its own folder."""
    if os.environ.get("SWEEP_TRIAL_DIR"):
        return os.environ["SWEEP_TRIAL_DIR"]
    settings = {name: config.get(name) for name in sorted(given - NOT_DEFINING)}
    settings["wandb_run_id"] = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return os.path.join("outputs", f"{script_name}-{digest}")


def prepare_output_dir(training_args, data_args, script_name, config, given):
    """Settle output_dir (default_output_dir unless --output_dir) and check it. Returns the checkpoint to resume
    from (--resume_from_checkpoint, else the newest complete one unless --overwrite_output_dir) and the run's
    record for run_info.json (command line and settings, tokens hidden; prepare_trainer writes it). A run that
    already finished says so and exits 0. A folder holding files we did not write is refused; nothing is ever
    deleted."""
    if "output_dir" not in given:
        training_args.output_dir = config["output_dir"] = default_output_dir(script_name, config, given)
    out = training_args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out!r} is a file; give a folder path")
    # A sweep trial's own folder (sweep.py sets SWEEP_TRIAL_DIR) holds the agent's command, log and metrics files.
    trial_dir = os.environ.get("SWEEP_TRIAL_DIR")
    agents_folder = bool(trial_dir) and os.path.realpath(out) == os.path.realpath(trial_dir)
    marker = os.path.join(out, RUN_MARKER)
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(marker) and not agents_folder:
        raise UserError(f"--output_dir {out!r} holds files this script did not write; choose an empty or new --output_dir")
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
        _exit_if_finished(marker, script_name, config, training_args.process_index == 0)
        checkpoint = find_resume_checkpoint(out)
        if checkpoint:
            logger.info("Resuming from %s (pass --overwrite_output_dir to start fresh)", checkpoint)
    run_info = {"script": script_name, "argv": _redacted(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "config": json.loads(json.dumps(config, default=str))}
    return checkpoint, run_info


def write_run_info(training_args, run_info):
    """Create output_dir and write run_info.json: only once the Trainer is ready, so a run stopped by an error
    before (bad data, a bad flag) leaves no folder behind."""
    if training_args.process_index == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, RUN_MARKER), "w", encoding="utf-8") as f:
            json.dump(run_info, f, indent=2)


def _comparable(config):
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in NOT_DEFINING}, default=str))


def _exit_if_finished(marker, script_name, config, say=True):
    """The same run finished here before: say where its results are (`say`: the first process) and exit 0
    instead of training again."""
    try:
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return
    if info.get("finished") and info.get("script") == script_name and _comparable(info.get("config", {})) == _comparable(config):
        out = os.path.dirname(marker)
        if say:
            print(f"This run already finished ({info['finished']}): model in {out}, results in "
                  f"{os.path.join(out, 'all_results.json')}. Pass --overwrite_output_dir to train it again.", flush=True)
        raise SystemExit(0)


def mark_finished(training_args):
    """Record in run_info.json that the run completed, so running the same command again says so."""
    marker = os.path.join(training_args.output_dir, RUN_MARKER)
    if training_args.do_train and training_args.process_index == 0 and os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
        info["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(marker, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, default=str)


def _redacted(argv):
    """argv with token values hidden, so secrets never land in files."""
    secret, out = ("--token", "--hub_token"), []
    for i, item in enumerate(argv):
        name, equals, _ = item.partition("=")
        if name in secret and equals:
            item = f"{name}=<hidden>"
        elif i and argv[i - 1] in secret:
            item = "<hidden>"
        out.append(item)
    return out
