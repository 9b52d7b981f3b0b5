"""Argument dataclasses shared by the training scripts, and the one parse helper they all use.

`ModelArguments` and `DataArguments` keep the field names of the Hugging Face examples, so users' habits
and sweep YAMLs carry over. `TrainingArguments` comes from transformers as it is.

`parse_args` accepts:
    python run_mlm.py --learning_rate 3e-4 --weight_decay=0.01      # both forms; `wandb agent` emits --k=v
    python run_mlm.py config.yaml                                    # a .json / .yaml / .yml file
    python run_mlm.py config.yaml --learning_rate 1e-4               # file plus CLI overrides (CLI wins)

`flags_given` says which flags the user set (command line and config file): every "unless the user chose
otherwise" default in the scripts reads it.
"""

import dataclasses
import difflib
import json
import os
import sys
from argparse import ArgumentDefaultsHelpFormatter
from dataclasses import dataclass, field
from typing import Optional

import yaml
from transformers import HfArgumentParser

CONFIG_FILE_EXTENSIONS = (".json", ".yaml", ".yml")
DATA_FILE_EXTENSIONS = ("txt", "text", "raw", "csv", "tsv", "json", "jsonl", "parquet")


def file_format(path):
    """A data file's format: its extension, under a .gz or .zst one (corpus.jsonl.zst -> jsonl); "" if none."""
    base = os.path.basename(path).lower().removesuffix(".gz").removesuffix(".zst")
    return base.rsplit(".", 1)[-1] if "." in base else ""


class UserError(Exception):
    """A mistake in the user's input. Scripts print it as one line and exit with status 2."""


def run_cli(main):
    """Run `main()` as a command: a UserError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Pretrained model to start from: a Hub id or a local folder. Leave unset to train from scratch."})
    model_type: Optional[str] = field(default=None, metadata={
        "help": "Model type for a from-scratch run (e.g. bert, roberta, t5), when no --config_name is given."})
    config_name: Optional[str] = field(default=None, metadata={
        "help": "Config to build the model from (Hub id, folder or .json file), if not the model's own."})
    config_overrides: Optional[str] = field(default=None, metadata={
        "help": "Comma-separated key=value pairs that change a from-scratch config, e.g. "
                "'num_hidden_layers=4,hidden_size=256'. Not allowed with --model_name_or_path."})
    tokenizer_name: Optional[str] = field(default=None, metadata={
        "help": "Tokenizer to use (Hub id or folder), if not the model's own."})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "Where to keep models, datasets and tokenized data downloaded or built here."})
    use_fast_tokenizer: bool = field(default=True, metadata={
        "help": "Use a fast (Rust `tokenizers`) tokenizer when the model has one."})
    model_revision: str = field(default="main", metadata={
        "help": "Model version to use: a branch name, tag or commit id."})
    token: Optional[str] = field(default=None, metadata={
        "help": "Hugging Face Hub token for private models/datasets (default: the one from `hf auth login`)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow models/datasets whose code lives on the Hub to run here. Only for repos you trust."})
    dtype: Optional[str] = field(default=None, metadata={
        "help": "dtype to load the model weights in; 'auto' takes the checkpoint's dtype.",
        "choices": ["auto", "bfloat16", "float16", "float32"]})
    peak_tflops: Optional[float] = field(default=None, metadata={
        "help": "The device's peak TFLOP/s for train/mfu. Default: the published dense peak of known GPUs for the "
                "run's dtype; on a CPU a matrix multiply measured once per machine."})

    def __post_init__(self):
        if self.config_overrides and (self.model_name_or_path or self.config_name):
            raise UserError("--config_overrides only applies to a model trained from scratch; drop it, or drop "
                            "--model_name_or_path/--config_name and use --model_type")
        for item in self.config_overrides.split(",") if self.config_overrides else []:
            if "=" not in item:
                raise UserError(f"--config_overrides item {item!r} is not key=value; write e.g. "
                                "'num_hidden_layers=4,hidden_size=256'")


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(default=None, metadata={
        "help": "Dataset to use from the Hub (e.g. Salesforce/wikitext)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={
        "help": "Configuration of that dataset (e.g. wikitext-2-raw-v1)."})
    train_file: Optional[str] = field(default=None, metadata={
        "help": "Local training data: .txt, .csv, .tsv, .json, .jsonl or .parquet (.gz/.zst compressed too); a "
                "folder or a glob pattern of such files (shards) reads them all."})
    validation_file: Optional[str] = field(default=None, metadata={
        "help": "Local evaluation data, same formats as --train_file."})
    validation_split_percentage: int = field(default=5, metadata={
        "help": "Percent of the training data held out for evaluation when there is no validation split."})
    max_seq_length: Optional[int] = field(default=None, metadata={
        "help": "Tokens per training example; longer text is cut."})
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={
        "help": "Processes for tokenization (default: one)."})
    overwrite_cache: bool = field(default=False, metadata={
        "help": "Tokenize again even if a cached copy of the tokenized data exists."})
    max_train_samples: Optional[int] = field(default=None, metadata={
        "help": "Use at most this many training examples (for quick runs and debugging)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={
        "help": "Use at most this many evaluation examples."})
    streaming: bool = field(default=False, metadata={
        "help": "Stream the training data: read, tokenized and packed on the fly in each process's DataLoader "
                "workers, resumed in constant time (streaming.py); needs --max_steps."})
    shuffle_buffer_size: int = field(default=1000, metadata={
        "help": "With --streaming: blocks shuffled together (each window of this many is shuffled, seeded; a resumed "
                "run reads one window again). Shards are shuffled each epoch too; 1 keeps the order."})
    stream_lanes: Optional[int] = field(default=None, metadata={
        "help": "With --streaming: streams the shards are dealt to, which fixes the data order whatever the number of "
                "processes and workers (default: processes x dataloader workers; a multiple of that)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start from scratch even if output_dir holds checkpoints. By default a rerun resumes from the "
                "newest complete checkpoint there. Nothing is deleted either way."})

    def __post_init__(self):
        if self.dataset_name and (self.train_file or self.validation_file):
            raise UserError("give either --dataset_name or --train_file/--validation_file, not both")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is None or os.path.isdir(path) or any(c in path for c in "*?["):  # shards: checked when found
                continue
            extension = file_format(path)
            if extension not in DATA_FILE_EXTENSIONS:
                raise UserError(f"--{name} {path!r} has an unknown extension {extension!r}; use one of "
                                + ", ".join("." + e for e in DATA_FILE_EXTENSIONS))
        if self.shuffle_buffer_size < 1 or (self.stream_lanes is not None and self.stream_lanes < 1):
            raise UserError("--shuffle_buffer_size and --stream_lanes must be positive integers")
        if not 0 <= self.validation_split_percentage < 100:
            raise UserError("--validation_split_percentage must be between 0 and 99")
        if self.max_seq_length is not None and self.max_seq_length < 8:
            raise UserError("--max_seq_length must be at least 8")
        for name in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name} must be a positive integer")


# Flags that transformers 5 removed from TrainingArguments but that users' notes and sweep files still use.
# Each maps to its current meaning; `wandb agent` writes them as --k=v, people as --k v or bare --k.
LEGACY_FLAGS = {
    "evaluation_strategy": "eval_strategy",
    "warmup_ratio": "warmup_steps",  # warmup_steps takes a float in [0, 1) as a ratio of total steps
    "no_cuda": "use_cpu",
    "max_test_samples": "max_predict_samples",
}
LEGACY_NOTES = {
    "warmup_ratio": "a value below 1 is read as a fraction of the total steps",
    "overwrite_output_dir": "it now means: start fresh instead of resuming (nothing is deleted)",
}


# TrainingArguments defaults the scripts change: they apply unless given, and --help shows them.
TRAINING_DEFAULTS = {
    "logging_steps": 0.02,  # a fraction of the steps: ~50 loss logs a run, every step in shorter runs
    "ddp_find_unused_parameters": False,  # the models here use all their weights: skip DDP's search each step
    "include_num_input_tokens_seen": True,  # (= "all") feeds train/tokens_per_second and train/mfu
}
# Defaults that depend on the run (train_utils.finalize_training_args and prepare_output_dir apply them):
# --help states the rule instead of transformers' value.
TRAINING_DEFAULT_RULES = {
    "output_dir": "outputs/<script>-<hash of the settings given>, so the same command finds it again; under "
                  "sweep.py the trial's folder",
    "do_train": "on when none of --do_train, --do_eval, --do_predict is given",
    "do_eval": "on when none of --do_train, --do_eval, --do_predict is given",
    "report_to": "none; wandb when started by `wandb agent`",
    "dataloader_pin_memory": "True on a GPU, False without one",
    "use_cpu": "True on a machine without a GPU (so torchrun starts CPU processes in one group)",
}


class _HelpFormatter(ArgumentDefaultsHelpFormatter):
    """Shows a script's own default rule (action.default_rule) where it has one; a help text that states its
    default in words ("Default: ...") gets no "(default: None)" after it; else argparse's default."""

    def _get_help_string(self, action):
        rule = getattr(action, "default_rule", None)
        if rule:
            return f"{action.help or ''} (default: {rule})".replace("%", "%%")
        return action.help if "Default:" in (action.help or "") else super()._get_help_string(action)


class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (UserError) instead of usage text plus exit, and whose
    --help shows the scripts' defaults (`defaults`: values; `rules`: run-dependent defaults, in words)."""

    def __init__(self, dataclass_types, defaults=None, rules=None):
        super().__init__(dataclass_types, formatter_class=_HelpFormatter)
        dests = {action.dest for action in self._actions}
        self.set_defaults(**{k: v for k, v in {**TRAINING_DEFAULTS, **(defaults or {})}.items() if k in dests})
        rules = {**TRAINING_DEFAULT_RULES, **(rules or {})}
        for action in self._actions:
            if action.dest in rules and action.option_strings and not action.option_strings[0].startswith("--no_"):
                action.default_rule = rules[action.dest]

    def error(self, message):
        raise UserError(message)


def _flag_names(parser):
    return sorted(opt[2:] for action in parser._actions for opt in action.option_strings if opt.startswith("--"))


def _translate_legacy(argv, known):
    """Rename legacy flags in an argv list and print one deprecation line for each one used."""
    out = []
    for item in argv:
        if item.startswith("--"):
            name, sep, value = item[2:].partition("=")
            if name in LEGACY_FLAGS and LEGACY_FLAGS[name] in known:
                new = LEGACY_FLAGS[name]
                note = f" ({LEGACY_NOTES[name]})" if name in LEGACY_NOTES else ""
                print(f"deprecated: --{name} was removed in transformers 5; using --{new}{note}", file=sys.stderr)
                item = f"--{new}{sep}{value}"
            elif name == "warmup_ratio":
                raise UserError("--warmup_ratio: use --warmup_steps with a value below 1 (a ratio of total steps)")
            elif name == "overwrite_output_dir":
                print(f"note: --overwrite_output_dir: {LEGACY_NOTES[name]}", file=sys.stderr)
        out.append(item)
    return out


def _check_unknown(argv, known):
    for item in argv:
        if item.startswith("--"):
            name = item[2:].partition("=")[0]
            if name not in known:
                close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
                if len(close) == 2 and close[0].replace("eval", "train") == close[1].replace("eval", "train"):
                    close.sort(key=lambda flag: "train" not in flag)  # the train flag first, its eval twin beside
                    hint = f"; did you mean --{close[0]} (or --{close[1]})?"
                else:
                    hint = f"; did you mean --{close[0]}?" if close else "; run with --help to list the flags"
                raise UserError(f"unknown flag --{name}{hint}")


def _file_to_argv(path):
    """Turn a .json/.yaml config file into CLI items, so that later CLI items override it."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f) or {}  # YAML is a superset of JSON
        except yaml.YAMLError as err:
            raise UserError(f"config file {path!r} is not valid JSON/YAML: {str(err).splitlines()[0]}")
    if not isinstance(values, dict):
        raise UserError(f"config file {path!r} must hold a mapping of flag names to values")
    argv = []
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif value is not None:
            argv.append(f"--{key}={value}")
    return argv


def _without_accelerator():
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6 also knows XPU, NPU, ...
    return not (accelerator.is_available() if accelerator else torch.cuda.is_available())


def _expand(argv):
    """argv with a leading .json/.yaml config file turned into flags (later flags override it)."""
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_FILE_EXTENSIONS):
        return _file_to_argv(argv[0]) + argv[1:]
    return argv


def flags_given(argv):
    """Names of the flags the user set, on the command line or in a leading config file, legacy names
    translated (--evaluation_strategy counts as eval_strategy). The one place the scripts ask this."""
    names = {item[2:].partition("=")[0] for item in _expand(list(argv)) if item.startswith("--")}
    return {LEGACY_FLAGS.get(name, name) for name in names}


def parse_args(dataclass_types, argv=None, defaults=None, rules=None):
    """Parse CLI flags and/or a config file into the given dataclasses (in that order). `defaults` and `rules`:
    a script's own defaults beside TRAINING_DEFAULTS and TRAINING_DEFAULT_RULES (values; rules in words)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(dataclass_types, defaults, rules)
    known = _flag_names(parser)
    known_with_legacy = known + [k for k in list(LEGACY_FLAGS) if LEGACY_FLAGS[k] in known]
    argv = _expand(argv)
    _check_unknown(argv, known_with_legacy)
    argv = _translate_legacy(argv, known)
    if "use_cpu" in known and _without_accelerator():
        # TrainingArguments refuses --bf16 without a GPU unless told to use the CPU, and without it processes
        # started by torchrun / accelerate launch form no (gloo) group: each would train alone, writing one folder.
        argv.append("--use_cpu=True")
    try:
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except UserError:
        raise
    except ValueError as err:  # TrainingArguments.__post_init__ checks, e.g. strategies that do not fit
        raise UserError(str(err).strip().splitlines()[0]) from err


def to_config_dict(*dataclass_objects):
    """All settings of a run as one flat dict (for W&B and the saved run config), without secrets."""
    config = {}
    for obj in dataclass_objects:
        values = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        config.update(values)
    for secret in ("token", "hub_token"):
        if config.get(secret):
            config[secret] = "<hidden>"
    return config
