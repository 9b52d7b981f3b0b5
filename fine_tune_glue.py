"""Fine-tune on GLUE, or on any sentence / sentence-pair classification or regression data, with an encoder
(BERT, RoBERTa, MiniLM, ...: a classification head) or with T5 (text-to-text: the label written as a word).

Runnable commands:
    python fine_tune_glue.py --model_name_or_path ../shared/models/minilm-l6-h384-uncased --task_name sst2 \
        --data_dir ../shared/data/glue/SST-2 --max_train_samples 8000 --num_train_epochs 1 \
        --per_device_train_batch_size 32 --learning_rate 5e-5   # original GLUE files, offline; minutes on a CPU
    python fine_tune_glue.py --model_name_or_path google-bert/bert-base-cased --task_name mrpc \
        --num_train_epochs 3 --learning_rate 2e-5 --output_dir out/mrpc      # GLUE from the Hub (nyu-mll/glue)
    python fine_tune_glue.py --model_name_or_path google-t5/t5-small --task_name rte --learning_rate 3e-4
    python fine_tune_glue.py --model_name_or_path FacebookAI/roberta-base --train_file train.csv \
        --validation_file dev.csv --test_file test.csv --text_column_names review --do_train --do_eval --do_predict
    python fine_tune_glue.py ... --eval_strategy epoch --save_strategy epoch --load_best_model_at_end
    python fine_tune_glue.py config.yaml --learning_rate 1e-5   # or: torchrun --nproc_per_node 2 fine_tune_glue.py ...

T5 and other encoder-decoders train text-to-text ("mnli hypothesis: ... premise: ..." -> "neutral"); a generated
text that is no label counts as wrong, a regression output that is no number as 0.0. Inputs are cut at
--max_seq_length (default 128 here) and padded per batch, in batches of similar length. Metrics as HF's run_glue.py
reports them (eval_accuracy, eval_f1, eval_matthews_correlation, eval_pearson, eval_combined_score, ...; MNLI adds
eval_*_mm); --load_best_model_at_end picks by cola matthews_correlation, stsb pearson, mrpc/qqp f1, else accuracy.
--do_predict writes output_dir/predict_results_<task>.txt. Reruns resume; `main(argv)` returns all_results.json.
"""

import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

NEEDS = {"model": "a model (--model_name_or_path: a Hub id or folder)",
         "data": "data (--task_name: GLUE from the Hub, or its original files with --data_dir; or --train_file and "
                 "--validation_file)"}
EXAMPLES = ("python fine_tune_glue.py --model_name_or_path bert-base-uncased --task_name mrpc; python fine_tune_glue.py "
            "--model_name_or_path bert-base-uncased --train_file train.csv --validation_file dev.csv")
if __name__ == "__main__" and len(sys.argv) == 1:  # a bare run gets its answer before the slow imports below
    print(f"error: fine_tune_glue.py needs {' and '.join(NEEDS.values())}; e.g. {EXAMPLES}", file=sys.stderr)
    sys.exit(2)

import evaluate
import numpy as np
import transformers
from datasets import ClassLabel
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    set_seed,
)

import data_utils
import glue_data
import run_folder
import throughput
import train_utils
from arguments import DataArguments, ModelArguments, UserError, flags_given, run_cli, to_config_dict
from glue_data import GLUE_TASKS, MAIN_METRIC

if int(transformers.__version__.split(".")[0]) < 5:
    sys.exit("fine_tune_glue.py needs transformers 5.x: pip install -r requirements.txt")

HERE = os.path.dirname(os.path.abspath(__file__))
@dataclass
class GlueArguments:
    task_name: Optional[str] = field(default=None, metadata={
        "help": f"GLUE task ({', '.join(GLUE_TASKS)}); read from nyu-mll/glue on the Hub unless data files are given."})
    data_dir: Optional[str] = field(default=None, metadata={
        "help": "A task folder of the original GLUE download, e.g. glue_data/SST-2 (train.tsv, dev.tsv, test.tsv; "
                "MNLI: dev_matched.tsv, dev_mismatched.tsv, ...)."})
    test_file: Optional[str] = field(default=None, metadata={
        "help": "Local data for --do_predict (labels optional), same formats as --train_file."})
    text_column_names: Optional[str] = field(default=None, metadata={
        "help": "One or two comma-separated text columns of other data (default: sentence1,sentence2 or sentence or text)."})
    label_column_name: str = field(default="label", metadata={
        "help": "Label column of other data: strings or ints are classes (in sorted order), floats regression."})
    max_predict_samples: Optional[int] = field(default=None, metadata={
        "help": "Use at most this many test examples (alias: --max_test_samples)."})
    pad_to_max_length: bool = field(default=False, metadata={
        "help": "Pad all to max_seq_length as HF's run_glue.py does: fixed shapes, but slower than padding per batch. "
                "Changes the padding only; for run_glue's shuffled order add --train_sampling_strategy=random."})
    text_to_text: Optional[bool] = field(default=None, metadata={
        "help": "true/false. T5-style: input '<task> <field>: <text> ...', the label as a word, predicted by generation; "
                "an output that is no label counts as wrong, a regression output that is no number as 0.0. "
                "Default: true for encoder-decoder models."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={
        "help": "Start a new classification head if the checkpoint's has a different number of labels."})
    dropout: Optional[float] = field(default=None, metadata={
        "help": "Dropout for fine-tuning (encoders: hidden and attention dropout; T5: dropout_rate, which T5 v1.1 "
                "checkpoints carry as 0.0 from pre-training; T5 fine-tuned with 0.1). Default: the checkpoint's."})

    def __post_init__(self):
        if self.task_name is not None:
            name = self.task_name.lower().replace("-", "")  # SST-2, STS-B: the GLUE download's folder names
            if name not in GLUE_TASKS:
                close = difflib.get_close_matches(name, GLUE_TASKS, n=1, cutoff=0.5)
                hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(GLUE_TASKS)}"
                raise UserError(f"unknown --task_name {self.task_name!r}; {hint} (other data: drop --task_name)")
            self.task_name = name
        if self.data_dir and not (self.task_name and os.path.isdir(self.data_dir)):
            raise UserError(f"--data_dir {self.data_dir!r} must be a GLUE task folder (e.g. glue_data/SST-2) and "
                            "needs --task_name (e.g. sst2)")
        folder_task = os.path.basename(os.path.normpath(self.data_dir or "")).lower().replace("-", "")
        if folder_task in GLUE_TASKS and folder_task != self.task_name:  # the download's folders are named by task
            raise UserError(f"--data_dir {self.data_dir!r} is GLUE's {folder_task} folder, but --task_name is "
                            f"{self.task_name}; pass --task_name {folder_task}, or the {self.task_name} folder")
        if self.test_file and self.test_file.rsplit(".", 1)[-1].lower() not in ("csv", "tsv", "json", "jsonl", "parquet"):
            raise UserError(f"--test_file {self.test_file!r}: use a .csv, .tsv, .json, .jsonl or .parquet file")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UserError("--dropout must be in [0, 1), e.g. 0.1")
        if self.text_column_names and not 1 <= len(self.text_column_names.split(",")) <= 2:
            raise UserError("--text_column_names takes one or two column names, e.g. 'question,answer'")


def format_t5_input(task_name, texts):  # ADAPT: the text-to-text format
    """T5's input `<task> <field>: <text> ...` (Raffel et al. 2020, appendix D). T5's GLUE preprocessor sorts
    the fields by name, hence `mnli hypothesis: ... premise: ...`; other data keeps the given order."""
    names = sorted(texts) if task_name in GLUE_TASKS else list(texts)
    return " ".join(([task_name] if task_name else []) + [f"{name}: {(texts[name] or '').strip()}" for name in names])


def format_t5_target(value, names, lookup):
    """The label as T5 writes it: its name; for regression (names None) the score rounded to the nearest 0.2
    with one decimal, as T5 does for STS-B ("3.75" -> "3.8")."""
    return f"{round(float(value) * 5) / 5:.1f}" if names is None else names[lookup[str(value)]]


def is_number(value):
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def get_labels(raw, task_name, model_names=None):  # ADAPT: label mapping
    """Label names in class order (None: regression), and a lookup from raw label values (a name, or a class id
    written as text) to the class index. Fails, naming the value, on a label outside that set."""
    source = raw["train"] if "train" in raw else next((d for d in raw.values() if "label" in d.column_names), None)
    feature = source.features["label"] if source is not None else None
    by_id = task_name is not None or isinstance(feature, ClassLabel)  # ints are class ids, not names
    if task_name:
        names = GLUE_TASKS[task_name].labels
    elif isinstance(feature, ClassLabel):
        names = feature.names
    elif feature is not None and feature.dtype.startswith("float"):
        names = None
    elif model_names:
        names = model_names
    elif source is not None:
        names = [str(value) for value in sorted(source.unique("label"))]
    else:
        raise UserError("no labelled data to learn the classes from; give --train_file, or a fine-tuned model")
    lookup = None if names is None else {**({str(i): i for i in range(len(names))} if by_id else {}),
                                         **{name: i for i, name in enumerate(names)}}
    for split, dataset in raw.items():
        values = dataset.unique("label") if "label" in dataset.column_names else []
        bad = [v for v in values if (not is_number(v) if names is None else str(v) not in lookup)]
        if bad and names is None:
            raise UserError(f"the {split} labels must be numbers for regression ({task_name or 'float labels'}); "
                            f"found {bad[0]!r}: fix the data")
        if bad:
            raise UserError(f"the {split} data has label {bad[0]!r}, not one of the model's labels "
                            f"({', '.join(names)}); fix the data, or train on data that has it")
    return (list(names) if names else None), lookup


def main(argv=None):
    # 1. Arguments
    argv = list(sys.argv[1:] if argv is None else argv)
    arg_types = (ModelArguments, DataArguments, GlueArguments, Seq2SeqTrainingArguments)
    # Similar lengths in a batch: little padding. Also under --pad_to_max_length, which changes the padding and
    # nothing else, so the two settings see the same batches in the same order. 128 tokens: BERT's GLUE setting.
    defaults = {"train_sampling_strategy": "group_by_length", "max_seq_length": 128}
    model_args, data_args, glue_args, training_args = glue_data.parse_args_checking_best_model(
        arg_types, argv, defaults=defaults)
    given = flags_given(argv)
    train_utils.finalize_training_args(training_args, given)
    data = (data_args.train_file or data_args.validation_file or glue_args.test_file or data_args.dataset_name
            or glue_args.task_name)
    lacking = [NEEDS[part] for part, present in (("model", model_args.model_name_or_path), ("data", data))
               if not present]
    if lacking:  # all named at once: one round trip
        raise UserError(f"fine_tune_glue.py needs {' and '.join(lacking)}; e.g. {EXAMPLES}")
    if data_args.streaming:
        raise UserError("--streaming is not supported here (classification data fits in memory); drop it")

    # 2. Logging, seed, tracking
    train_utils.setup_logging(training_args)
    config_dict = to_config_dict(model_args, data_args, glue_args, training_args)
    resume_from, run_info = run_folder.prepare_output_dir(training_args, data_args, "fine_tune_glue", config_dict, given)
    set_seed(training_args.seed)

    # 3. Datasets
    task = glue_args.task_name
    wanted = {"train": training_args.do_train, "validation": training_args.do_eval, "test": training_args.do_predict}
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": glue_args.test_file}
    raw = glue_data.load_glue_splits(wanted, files, task, glue_args.data_dir, data_args.dataset_name,
                                      data_args.dataset_config_name, model_args.cache_dir, model_args.token,
                                      data_args.validation_split_percentage, training_args.seed)
    raw, text_columns = glue_data.standardize_columns(raw, glue_args)
    names, lookup = get_labels(raw, task)

    # 4. Model and tokenizer
    hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
               trust_remote_code=model_args.trust_remote_code)
    config = data_utils.load_pretrained_config(model_args.config_name or model_args.model_name_or_path, model_args)
    text_to_text = bool(config.is_encoder_decoder) if glue_args.text_to_text is None else glue_args.text_to_text
    if text_to_text and not config.is_encoder_decoder:
        raise UserError(f"--text_to_text needs an encoder-decoder model such as google-t5/t5-small, not a "
                        f"{config.model_type}; drop the flag to train a classification head")
    if names and not task and not training_args.do_train and glue_data.model_label_names(config):
        names, lookup = get_labels(raw, task, glue_data.model_label_names(config))  # a fine-tuned model's classes
    if glue_args.dropout is not None:  # ADAPT: where other architectures keep their dropout
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate", "dropout", "attention_dropout"):
            if hasattr(config, key):
                setattr(config, key, glue_args.dropout)
    regression, model_ids = names is None, None
    if regression and not text_to_text:
        config.num_labels, config.problem_type = 1, "regression"
    elif not text_to_text:
        model_ids = glue_data.align_with_model_labels(names, config, must_match=not training_args.do_train)
        config.id2label = {model_ids[i]: name for i, name in enumerate(names)}
        config.label2id = {name: model_ids[i] for i, name in enumerate(names)}
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                              use_fast=model_args.use_fast_tokenizer, **hub)
    max_seq_length = data_args.max_seq_length  # 128 unless given: nearly all GLUE examples fit
    limit = min([n for n in (getattr(config, "max_position_embeddings", None), tokenizer.model_max_length)
                 if n and n < 1_000_000] or [max_seq_length])  # RoBERTa: 514 positions but 512 tokens
    if max_seq_length > limit:
        raise UserError(f"--max_seq_length {max_seq_length} exceeds the model's limit of {limit} tokens; use at most {limit}")
    try:
        model = (AutoModelForSeq2SeqLM if text_to_text else AutoModelForSequenceClassification).from_pretrained(
            model_args.model_name_or_path, config=config, dtype=model_args.dtype,
            ignore_mismatched_sizes=glue_args.ignore_mismatched_sizes, **hub)
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise UserError(f"the checkpoint's classification head does not fit the {config.num_labels} label(s) here; "
                        "pass --ignore_mismatched_sizes to start a new head") from None
    if text_to_text:
        training_args.predict_with_generate = True  # labels are read back from generated text, which may stop
        # after the longest label: nothing longer can be right (8 tokens hold any score).
        model.generation_config.max_new_tokens = max(len(ids) for ids in tokenizer(names)["input_ids"]) if names else 8

    # 5. Preprocessing. ADAPT: how examples become model inputs and labels.
    padding = "max_length" if glue_args.pad_to_max_length else False

    def tokenize(batch):
        if text_to_text:
            examples = [dict(zip(text_columns, texts)) for texts in zip(*(batch[c] for c in text_columns))]
            encoded = tokenizer([format_t5_input(task, example) for example in examples], max_length=max_seq_length,
                                truncation=True, padding=padding)
            if "label" in batch:
                targets = [format_t5_target(value, names, lookup) for value in batch["label"]]
                encoded["labels"] = tokenizer(text_target=targets)["input_ids"]
            return encoded
        texts = [[text or "" for text in batch[c]] for c in text_columns]  # one text, or a pair
        encoded = tokenizer(*texts, max_length=max_seq_length, truncation=True, padding=padding)
        if "label" in batch:
            encoded["labels"] = [float(v) if regression else model_ids[lookup[str(v)]] for v in batch["label"]]
        return encoded

    max_samples = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
                   "test": glue_args.max_predict_samples}
    key = (data_utils.tokenizer_fingerprint(tokenizer), max_seq_length, padding, text_to_text, task, names, model_ids)
    tokenized = {}
    with training_args.main_process_first(desc="tokenizing"):
        for split, dataset in raw.items():
            dataset = data_utils.take_at_most(dataset, max_samples[split.removesuffix("_mm")])
            tokenized[split] = data_utils.cached_map(
                dataset, tokenize, key, model_args.cache_dir, data_args.overwrite_cache, desc=f"Tokenizing {split}",
                batched=True, remove_columns=dataset.column_names, num_proc=data_args.preprocessing_num_workers)

    # 6. Collator and metrics. ADAPT: what is measured.
    pad_multiple = 8 if training_args.fp16 or training_args.bf16 else None  # tensor cores work in multiples of 8
    collator = (glue_data.Seq2SeqCollator(tokenizer, model=model, pad_to_multiple_of=pad_multiple) if text_to_text
                else DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple))
    # Outside GLUE: GLUE's stsb metric gives the correlations, its sst2 metric plain accuracy.
    metric = evaluate.load(os.path.join(HERE, "metrics", "glue"), task or ("stsb" if regression else "sst2"))
    main_metric = MAIN_METRIC.get(task, "pearson" if regression else "accuracy")
    if training_args.load_best_model_at_end and "metric_for_best_model" not in given:
        training_args.metric_for_best_model, training_args.greater_is_better = main_metric, True
        config_dict.update(metric_for_best_model=main_metric, greater_is_better=True)  # for W&B
    model_to_index = np.argsort(model_ids) if model_ids else None  # the model's class id -> index in `names`

    def decode(token_ids):
        token_ids = np.where(token_ids < 0, tokenizer.pad_token_id, token_ids)  # -100 pads labels and gathers
        return [" ".join(text.split()) for text in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    def to_labels(outputs):
        """Class indices (-1: the text is no label) or scores (a text that is no number: 0.0)."""
        if text_to_text:
            texts = decode(outputs)
            if regression:
                return np.array([float(t) if is_number(t) else 0.0 for t in texts])
            return np.array([names.index(t) if t in names else -1 for t in texts])
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        return logits[:, 0] if regression else model_to_index[logits.argmax(-1)]

    def compute_metrics(eval_pred):
        predictions, references = to_labels(eval_pred.predictions), eval_pred.label_ids
        if text_to_text:
            references = to_labels(references)  # label text
        elif not regression:
            references = model_to_index[references]  # the model's class ids
        if not regression:  # an invalid output scores as a wrong class, as T5's f1_score_with_invalid does
            predictions = np.where(predictions < 0, (references + 1) % len(names), predictions)
        result = metric.compute(predictions=predictions, references=references)
        if len(result) > 1:  # as HF's run_glue reports for mrpc, qqp and stsb
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    def prediction_texts(outputs):
        if text_to_text and not regression:
            return decode(outputs)  # as generated: a label name, or the invalid text itself
        return [f"{v:.3f}" if regression else names[v] for v in to_labels(outputs)]

    # 7. Trainer
    trainer = (Seq2SeqTrainer if text_to_text else Trainer)(
        model=model, args=training_args, train_dataset=tokenized.get("train"), eval_dataset=tokenized.get("validation"),
        processing_class=tokenizer, data_collator=collator, compute_metrics=compute_metrics,
    )
    flops = throughput.transformer_flops_per_token(model, max_seq_length, head_fraction=0.0)  # no vocabulary head
    peak = throughput.peak_flops(training_args, model_args.peak_tflops)
    train_utils.prepare_trainer(trainer, config_dict, flops, peak, run_info)
    trainer.add_callback(glue_data.SaveOnEvalCallback())

    # 8. Train
    metrics = {}
    if training_args.do_train:
        result = train_utils.train(trainer, resume_from)
        trainer.save_model()  # model, config (with the label names) and tokenizer, loadable with from_pretrained
        train_metrics = dict(result.metrics, train_samples=len(tokenized["train"]),
                             peak_memory_mb=round(throughput.peak_memory_mb(), 1))
        train_utils.log_and_save(trainer, "train", train_metrics)
        metrics.update(train_metrics)

    # 9. Evaluate and save
    if training_args.do_eval:
        eval_metrics = dict(trainer.evaluate(), eval_samples=len(tokenized["validation"]))
        if "validation_mm" in tokenized:  # MNLI's mismatched genres, reported beside the matched ones
            mismatched = trainer.predict(tokenized["validation_mm"], metric_key_prefix="eval").metrics
            mismatched = {f"{k}_mm": v for k, v in mismatched.items()}
            trainer.log(mismatched)  # W&B: eval/accuracy_mm
            eval_metrics.update(mismatched, eval_samples_mm=len(tokenized["validation_mm"]))
        train_utils.log_and_save(trainer, "eval", eval_metrics)
        metrics.update(eval_metrics)
    if training_args.do_predict:
        # transformers 5 groups evaluation batches by length too under group_by_length: predict in file order.
        training_args.train_sampling_strategy = "random"
        predict_metrics = {}
        for split, suffix in (("test", ""), ("test_mm", "-mm")):
            if split in tokenized:
                output = trainer.predict(tokenized[split], metric_key_prefix="predict")
                predict_metrics.update({k + suffix.replace("-", "_"): v for k, v in output.metrics.items()})
                path = os.path.join(training_args.output_dir, f"predict_results_{task or 'data'}{suffix}.txt")
                if trainer.is_world_process_zero():
                    with open(path, "w", encoding="utf-8") as f:
                        f.write("index\tprediction\n")
                        f.writelines(f"{i}\t{text}\n" for i, text in enumerate(prediction_texts(output.predictions)))
        train_utils.log_and_save(trainer, "predict", predict_metrics)
        metrics.update(predict_metrics)
    run_folder.mark_finished(training_args)
    if training_args.should_log and f"eval_{main_metric}" in metrics:
        head = "text-to-text" if text_to_text else "regression head" if regression else "classification head"
        print(f"\nOutputs in {os.path.abspath(training_args.output_dir)}; eval {main_metric}: "
              f"{metrics[f'eval_{main_metric}']:.4f} ({task or 'data'}, {head})")
    return metrics


if __name__ == "__main__":
    run_cli(main)
