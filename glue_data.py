"""The GLUE side of fine_tune_glue.py: the task table, the original GLUE files' quirks, loading the splits,
the columns each task reads, a checkpoint's own label order, and the --load_best_model_at_end checks.

What a student changes (the T5 text format, the label mapping, the metrics) stays in fine_tune_glue.py.
"""

import csv
import logging
import math
import os
from collections import namedtuple

import transformers
from datasets import Dataset, load_dataset
from transformers import DataCollatorForSeq2Seq, TrainerCallback

from arguments import UserError, parse_args
from data_utils import check_data_file, load_data_file

logger = logging.getLogger(__name__)

GlueTask = namedtuple("GlueTask", "text_columns labels tsv_columns")
# Text columns as the Hub names them, in the order an encoder reads them; label names in the Hub's id order
# (None: regression); names in the original GLUE TSV files of the columns the Hub renamed.
GLUE_TASKS = {
    "cola": GlueTask(("sentence",), ("unacceptable", "acceptable"), {}),
    "sst2": GlueTask(("sentence",), ("negative", "positive"), {}),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                     {"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"}),
    "qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate"), {"is_duplicate": "label"}),
    "stsb": GlueTask(("sentence1", "sentence2"), None, {"score": "label"}),
    "mnli": GlueTask(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                     {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"}),
    "qnli": GlueTask(("question", "sentence"), ("entailment", "not_entailment"), {}),
    "rte": GlueTask(("sentence1", "sentence2"), ("entailment", "not_entailment"), {}),
    "wnli": GlueTask(("sentence1", "sentence2"), ("not_entailment", "entailment"), {}),
}
MAIN_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1", "qqp": "f1"}  # others: accuracy


def read_glue_tsv(path, flag, names_if_no_header=None):
    """A TSV file of the original GLUE download as a Dataset of string columns named by its header.

    GLUE's files need what generic CSV readers do not do by default: sentences hold bare `"` (so no
    quoting at all), MRPC starts with a UTF-8 byte-order mark, and CoLA's train/dev files have no header
    row. For those, pass the column names: a first row that shares no cell with them is read as data.
    Rows whose cell count differs from the header's are skipped with a warning.
    """
    check_data_file(path, flag)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    if not rows:
        raise UserError(f"{flag} {path!r} holds no rows; give a file with data")
    has_header = names_if_no_header is None or set(rows[0]) & set(names_if_no_header)
    header = rows.pop(0) if has_header else list(names_if_no_header)
    good = [row for row in rows if len(row) == len(header)]
    if len(good) < len(rows):
        logger.warning("%s: skipped %d of %d rows without %d tab-separated cells", path, len(rows) - len(good),
                       len(rows), len(header))
    return Dataset.from_dict({name: [row[i] for row in good] for i, name in enumerate(header)})


# The original GLUE download: one folder per task; MNLI has matched and mismatched dev/test sets ("_mm").
GLUE_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
MNLI_FILES = {"train": "train.tsv", "validation": "dev_matched.tsv", "validation_mm": "dev_mismatched.tsv",
              "test": "test_matched.tsv", "test_mm": "test_mismatched.tsv"}
HUB_GLUE_SPLITS = {"validation_matched": "validation", "validation_mismatched": "validation_mm",
                   "test_matched": "test", "test_mismatched": "test_mm"}  # nyu-mll/glue's MNLI split names
COLA_TSV_COLUMNS = ("source", "label", "original_label", "sentence")  # CoLA's train/dev files have no header
DO_FLAGS = {"train": "--do_train", "validation": "--do_eval", "test": "--do_predict"}


def load_glue_splits(wanted, files, task_name=None, data_dir=None, dataset_name=None, dataset_config_name=None,
                     cache_dir=None, token=None, validation_split_percentage=0, seed=42):
    """Raw splits train, validation, test (MNLI also validation_mm, test_mm) that `wanted` asks for, from
    `files` ({split: path}), else a GLUE task folder `data_dir`, else the Hub (`dataset_name`, or nyu-mll/glue
    for a GLUE task). With a task name, .tsv files are read in GLUE's own layout (read_glue_tsv). Without
    validation data, `validation_split_percentage` percent of train is held out (shuffled with `seed`)."""
    wanted = dict(wanted, validation_mm=wanted["validation"], test_mm=wanted["test"])
    paths = {split: (path, f"--{split}_file") for split, path in files.items() if path and wanted[split]}
    glue_files = (MNLI_FILES if task_name == "mnli" else GLUE_FILES) if data_dir else {}
    for split, name in glue_files.items():
        if wanted[split] and split not in paths and os.path.isfile(os.path.join(data_dir, name)):
            paths[split] = (os.path.join(data_dir, name), "--data_dir")
    if paths or data_dir:
        headerless = COLA_TSV_COLUMNS if task_name == "cola" else None
        raw = {split: read_glue_tsv(path, flag, headerless) if task_name and path.lower().endswith(".tsv")
               else load_data_file(path, flag, cache_dir) for split, (path, flag) in paths.items()}
    elif task_name or dataset_name:
        name = dataset_name or "nyu-mll/glue"
        try:
            hub = load_dataset(name, dataset_config_name or task_name, cache_dir=cache_dir, token=token)
        except Exception as err:  # offline, or a typo in the name
            raise UserError(f"could not load {name} from the Hub ({str(err).strip()[:200] or type(err).__name__}); "
                            "offline, give --data_dir path/to/glue_data/<TASK> or --train_file/--validation_file")
        raw = {HUB_GLUE_SPLITS.get(s, s): d for s, d in hub.items() if wanted.get(HUB_GLUE_SPLITS.get(s, s))}
    else:
        raise UserError("no data: give --task_name (GLUE), --dataset_name, or --train_file/--validation_file")
    # A GLUE folder must hold its dev set; elsewhere a share of train may stand in for a missing one.
    if wanted["validation"] and "validation" not in raw and "train" in raw and validation_split_percentage and not data_dir:
        held_out = raw["train"].train_test_split(validation_split_percentage / 100, seed=seed)
        raw["train"], raw["validation"] = held_out["train"], held_out["test"]
    for split, flag in DO_FLAGS.items():
        if wanted[split] and split not in raw:
            where = f"--data_dir {data_dir!r} has no {glue_files[split]}" if data_dir else f"there is no {split} data"
            raise UserError(f"{where}, which {flag} needs; give --{split}_file" + " or a GLUE task folder" * bool(task_name))
    return raw


class Seq2SeqCollator(DataCollatorForSeq2Seq):
    """DataCollatorForSeq2Seq that leaves `labels` out of unlabelled batches (a test set): transformers 5 sets
    labels=None there, and Seq2SeqTrainer's predict then runs the model for a loss without them and fails."""

    def __call__(self, features, return_tensors=None):
        batch = super().__call__(features, return_tensors)
        if batch.get("labels", 0) is None:
            del batch["labels"]
        return batch


def standardize_columns(raw, glue_args):
    """Columns renamed to the Hub's names (or the chosen ones); only the text columns and `label` are kept."""
    task = GLUE_TASKS.get(glue_args.task_name)
    columns = next(iter(raw.values())).column_names
    if task:
        text_columns = task.text_columns
    elif glue_args.text_column_names:
        text_columns = tuple(name.strip() for name in glue_args.text_column_names.split(","))
    else:
        guesses = [names for names in (("sentence1", "sentence2"), ("sentence",), ("text",)) if set(names) <= set(columns)]
        if not guesses:
            raise UserError(f"which columns hold the text? (columns: {', '.join(columns)}); name one or two with "
                            "--text_column_names, e.g. --text_column_names question,answer")
        text_columns = guesses[0]
    label_column = "label" if task else glue_args.label_column_name
    renames = task.tsv_columns if task else {label_column: "label"}
    for split, dataset in raw.items():
        if not task and label_column != "label" and "label" in dataset.column_names:
            dataset = dataset.remove_columns("label")  # another column is the label
        dataset = dataset.rename_columns({old: new for old, new in renames.items()
                                          if old in dataset.column_names and new not in dataset.column_names})
        present = ", ".join(dataset.column_names)
        missing = [name for name in text_columns if name not in dataset.column_names]
        if missing:
            fix = f"use the Hub's column names ({', '.join(text_columns)})" if task else "fix --text_column_names"
            raise UserError(f"the {split} data has no column {missing[0]!r} (columns: {present}); {fix}")
        has_label = "label" in dataset.column_names
        if has_label and split.startswith("test") and dataset.unique("label") == [-1]:
            has_label = False  # GLUE's test labels are secret: the Hub stores -1
        if not has_label and not split.startswith("test"):
            raise UserError(f"the {split} data has no label column {label_column!r} (columns: {present}); "
                            "name it with --label_column_name")
        raw[split] = dataset.select_columns(list(text_columns) + ["label"] * has_label)
    return raw, text_columns


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


def parse_args_checking_best_model(dataclass_types, argv, **parse_kwargs):
    """arguments.parse_args, then check_best_model_settings. transformers' own check of --load_best_model_at_end
    names no fix and rejects fractions such as 0.3 / 0.1 (a float remainder), so its error is set aside and
    the settings are judged here. TrainingArguments must be among the dataclasses."""
    try:
        outputs = parse_args(dataclass_types, argv, **parse_kwargs)
    except UserError as err:
        if "load_best_model_at_end" not in str(err):
            raise
        outputs = parse_args(dataclass_types, list(argv) + ["--load_best_model_at_end=false"], **parse_kwargs)
        next(o for o in outputs if isinstance(o, transformers.TrainingArguments)).load_best_model_at_end = True
    check_best_model_settings(next(o for o in outputs if isinstance(o, transformers.TrainingArguments)))
    return outputs


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
