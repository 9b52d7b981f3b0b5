"""Masked-language-model (BERT-style) pre-training or continued training with the Hugging Face Trainer.

Runnable commands:
    python run_mlm.py                                   # offline demo: tiny BERT, tokenizer trained on the fly,
                                                        # Python's own docs as corpus, ~2 minutes on 2 CPU cores
    python run_mlm.py --model_name_or_path bert-base-uncased --dataset_name Salesforce/wikitext \
        --dataset_config_name wikitext-2-raw-v1 --do_train --do_eval --output_dir out/bert-wikitext
    python run_mlm.py --config_name configs/bert-mini.json --train_file corpus.txt --validation_file dev.txt \
        --max_seq_length 128 --learning_rate 5e-4 --warmup_steps 0.1 --bf16 --output_dir out/bert-mini
    python run_mlm.py config.yaml --learning_rate 1e-4  # flags from a .json/.yaml file, CLI wins
    torchrun --nproc_per_node 2 run_mlm.py ...           # or: accelerate launch run_mlm.py ...

A rerun with the same --output_dir resumes from the newest complete checkpoint (--overwrite_output_dir
starts fresh). Results go to output_dir/all_results.json; `main(argv)` returns the same dict.
"""

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

# Set before torch loads its OpenMP runtime (libgomp): a thread that finishes its share of a parallel region
# spins for 10,000 iterations (libgomp's default: 300,000) before it sleeps. Long spinning starves the threads
# that still have work whenever other jobs share the cores (parallel sweep trials, a second run): beside one,
# training steps ran 2-3x faster with the short spin, and no slower alone (benchmarks/RESULTS.md). Set
# OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself to choose otherwise.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import evaluate
import pyarrow as pa
import numpy as np
import transformers
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    set_seed,
)

import data_utils
import train_utils
from arguments import DataArguments, ModelArguments, UserError, parse_args, run_cli

if int(transformers.__version__.split(".")[0]) < 5:
    sys.exit("run_mlm.py needs transformers 5.x: pip install -r requirements.txt")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "bert-tiny.json")
# `python run_mlm.py` with no arguments: a from-scratch run sized to finish in a few minutes on a laptop CPU.
DEMO_ARGS = [
    "--max_seq_length=128", "--per_device_train_batch_size=32", "--learning_rate=1e-3", "--warmup_steps=0.06",
    "--num_train_epochs=8", "--logging_steps=25", "--eval_on_start", "--save_steps=200", "--save_total_limit=2",
]


@dataclass
class MLMArguments:
    text_column_name: Optional[str] = field(
        default=None, metadata={"help": "Column holding the text (default: 'text', else the first column)."}
    )
    line_by_line: bool = field(
        default=False,
        metadata={"help": "One example per non-empty line (truncated), instead of packing text into full blocks."},
    )
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "With --line_by_line, pad every example to max_seq_length (fixed shapes)."}
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of tokens to mask (BERT: 0.15)."})
    whole_word_mask: bool = field(
        default=False, metadata={"help": "Mask all sub-tokens of a word together (needs a fast tokenizer); every "
                                 "chosen token becomes [MASK], as transformers' collator has no random replacement for it."}
    )
    tokenizer_vocab_size: int = field(
        default=8192,
        metadata={"help": "Vocabulary size of the WordPiece tokenizer trained when no tokenizer is given."},
    )
    sparse_mlm_head: bool = field(
        default=True,
        metadata={"help": "Compute the prediction head only at masked positions (faster, same result)."},
    )

    def __post_init__(self):
        if not 0.0 < self.mlm_probability < 1.0:
            raise UserError("--mlm_probability must be between 0 and 1 (BERT uses 0.15)")


def load_config(model_args):
    if model_args.config_name or model_args.model_name_or_path:
        return AutoConfig.from_pretrained(
            model_args.config_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir,
            revision=model_args.model_revision, token=model_args.token, trust_remote_code=model_args.trust_remote_code,
        )
    if model_args.model_type:
        if model_args.model_type not in CONFIG_MAPPING:
            raise UserError(f"unknown --model_type {model_args.model_type!r}; use e.g. bert, roberta, distilbert")
        config = CONFIG_MAPPING[model_args.model_type]()
    else:
        config = AutoConfig.from_pretrained(DEFAULT_CONFIG)
    if model_args.config_overrides:
        try:
            config.update_from_string(model_args.config_overrides)
        except ValueError as err:
            raise UserError(f"--config_overrides: {err}; see the model's config class for valid keys")
    return config


def load_tokenizer(model_args, data_args, mlm_args, training_args, raw_datasets, text_column, model_max_length):
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name:
        return AutoTokenizer.from_pretrained(
            name, cache_dir=model_args.cache_dir, use_fast=model_args.use_fast_tokenizer,
            revision=model_args.model_revision, token=model_args.token, trust_remote_code=model_args.trust_remote_code,
        )
    # From scratch and no tokenizer named: train one on the training text, once. A resumed run takes the
    # copy saved with its checkpoints; a new run on the same data (a sweep's next trial) takes the cached one.
    train = raw_datasets["train"]
    key = f"{getattr(train, '_fingerprint', 'stream')}-wordpiece{mlm_args.tokenizer_vocab_size}-{model_max_length}"
    cached = os.path.join(data_utils.cache_root(model_args.cache_dir), "tokenizers", key)
    for folder in (training_args.output_dir, cached):
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            train_utils.logger.info("Loaded the tokenizer trained earlier from %s", folder)
            return AutoTokenizer.from_pretrained(folder)
    texts = data_utils.batched_texts(train.take(200_000) if data_args.streaming else train, text_column)
    tokenizer = data_utils.train_wordpiece_tokenizer(texts, mlm_args.tokenizer_vocab_size, model_max_length,
                                                     output_dir=cached)
    train_utils.logger.info("Trained a WordPiece tokenizer (%d ids) on the training text; saved to %s", len(tokenizer),
                            cached)
    return tokenizer


def main(argv=None):
    # 1. Arguments
    argv = list(sys.argv[1:] if argv is None else argv)
    demo = not argv
    model_args, data_args, mlm_args, training_args = parse_args(
        (ModelArguments, DataArguments, MLMArguments, TrainingArguments), DEMO_ARGS if demo else argv
    )
    train_utils.finalize_training_args(training_args, [] if demo else argv, "run_mlm")
    if data_args.streaming and training_args.max_steps <= 0:
        raise UserError("--streaming needs --max_steps (a stream has no length to count epochs by)")

    # 2. Logging, seed, tracking
    train_utils.setup_logging(training_args)
    config_dict = train_utils.run_config(model_args, data_args, mlm_args, training_args)
    resume_from = train_utils.prepare_output_dir(training_args, data_args, "run_mlm", config_dict)
    set_seed(training_args.seed)

    # 3. Datasets
    raw_datasets = data_utils.load_raw_datasets(model_args, data_args, seed=training_args.seed)
    column_names = data_utils.column_names(raw_datasets)
    text_column = data_utils.pick_text_column(column_names, mlm_args.text_column_name)

    # 4. Model and tokenizer
    config = load_config(model_args)
    limit = getattr(config, "max_position_embeddings", 1024)
    # Several processes: the first trains and saves the tokenizer, the others then load that copy, so every
    # rank has the same vocabulary and no two write one folder at once.
    with training_args.main_process_first(local=False, desc="tokenizer"):
        tokenizer = load_tokenizer(model_args, data_args, mlm_args, training_args, raw_datasets, text_column, limit)
    if tokenizer.mask_token is None:
        raise UserError("the tokenizer has no mask token, so it cannot do masked-LM; pick a BERT/RoBERTa-style tokenizer")
    max_seq_length = data_args.max_seq_length or min(tokenizer.model_max_length, limit, 1024)
    if max_seq_length > limit:
        raise UserError(f"--max_seq_length {max_seq_length} exceeds the model's limit of {limit} positions; use at most {limit}")
    if model_args.model_name_or_path:
        model = AutoModelForMaskedLM.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
            token=model_args.token, trust_remote_code=model_args.trust_remote_code, dtype=model_args.dtype,
        )
    else:
        config.vocab_size = len(tokenizer)
        config.pad_token_id = tokenizer.pad_token_id
        model = AutoModelForMaskedLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        train_utils.logger.info("Training from scratch: %.1fM parameters", model.num_parameters() / 1e6)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    sparse_head = mlm_args.sparse_mlm_head and train_utils.enable_sparse_mlm_head(model)

    # 5. Preprocessing. ADAPT: how text becomes training examples.
    packing = not mlm_args.line_by_line
    encode = data_utils.TokenIds(tokenizer)

    def tokenize(batch):  # batch: a pyarrow Table (the data is formatted as "arrow" below)
        texts = data_utils.non_blank(batch[text_column])  # blank lines carry nothing
        if packing and not (mlm_args.pad_to_max_length or mlm_args.whole_word_mask):
            encoded = encode(texts)  # = tokenizer(texts)'s input_ids, computed faster (no offsets)
        else:
            encoded = tokenizer(
                texts, truncation=mlm_args.line_by_line, max_length=max_seq_length if mlm_args.line_by_line else None,
                padding="max_length" if mlm_args.pad_to_max_length else False, return_attention_mask=False,
                return_token_type_ids=False, return_offsets_mapping=mlm_args.whole_word_mask,
            )
        if not packing:
            return pa.table(dict(encoded))
        # Packing, in the same pass: the texts' tokens joined and cut into blocks of exactly max_seq_length
        # (no padding at all; each text keeps its [CLS] ... [SEP]).
        return data_utils.pack_token_ids(encoded, max_seq_length)

    map_args = dict(batched=True, batch_size=10_000, remove_columns=column_names,
                    desc=f"Tokenizing and packing into blocks of {max_seq_length}" if packing else "Tokenizing")
    if not data_args.streaming:
        map_args["num_proc"] = data_args.preprocessing_num_workers
    key = (data_utils.tokenizer_fingerprint(tokenizer), max_seq_length, mlm_args.line_by_line,
           mlm_args.pad_to_max_length, mlm_args.whole_word_mask)
    with training_args.main_process_first(desc="tokenizing"):
        tokenized = data_utils.cached_map(raw_datasets.with_format("arrow"), tokenize, key, model_args.cache_dir,
                                          data_args.overwrite_cache, **map_args).with_format(None)
    train_dataset = tokenized["train"] if training_args.do_train else None
    eval_dataset = tokenized["validation"] if training_args.do_eval else None
    if train_dataset is not None and data_args.max_train_samples:
        train_dataset = train_dataset.take(data_args.max_train_samples) if data_args.streaming else \
            train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if eval_dataset is not None and data_args.max_eval_samples:
        eval_dataset = eval_dataset.take(data_args.max_eval_samples) if data_args.streaming else \
            eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    # 6. Collator and metrics. ADAPT: masking scheme and what is measured.
    collator = data_utils.FastMLMCollator(
        tokenizer, mlm_probability=mlm_args.mlm_probability, whole_word_mask=mlm_args.whole_word_mask,
        # BERT's 80% [MASK] / 10% random / 10% kept; whole-word masking in transformers is [MASK] only
        mask_replace_prob=1.0 if mlm_args.whole_word_mask else 0.8, random_replace_prob=0.0 if mlm_args.whole_word_mask else 0.1,
        pad_to_multiple_of=8 if training_args.bf16 or training_args.fp16 else None, seed=training_args.seed,
    )
    if mlm_args.whole_word_mask:  # the collator reads offset_mapping, which the model's forward does not take
        training_args.remove_unused_columns = False
    accuracy = evaluate.load(os.path.join(HERE, "metrics", "mlm_accuracy"))

    def argmax_logits(logits, labels):  # keep token ids, never full-vocabulary logits
        return logits if sparse_head else logits.argmax(dim=-1)

    def compute_metrics(eval_pred):
        predictions, labels = eval_pred
        selected = labels != -100
        return accuracy.compute(predictions=predictions[selected], references=labels[selected])

    # 7. Trainer
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=argmax_logits if training_args.do_eval else None,
    )
    head_share = mlm_args.mlm_probability if sparse_head else 1.0
    flops = train_utils.transformer_flops_per_token(model, max_seq_length, head_fraction=head_share)
    peak = train_utils.cached_peak_flops(train_utils.compute_dtype(training_args), train_utils.device_kind(training_args))
    train_utils.add_callbacks(trainer, config_dict, flops_per_token=flops, peak_flops=peak)

    # 8. Train
    metrics = {}
    if training_args.do_train:
        result = train_utils.train(trainer, resume_from)
        trainer.save_model()  # model, config and tokenizer, loadable with from_pretrained
        train_metrics = dict(result.metrics, peak_memory_mb=round(train_utils.peak_memory_mb(), 1))
        if not data_args.streaming:
            train_metrics["train_samples"] = len(train_dataset)
        train_utils.log_and_save(trainer, "train", train_metrics)
        metrics.update(train_metrics)

    # 9. Evaluate and save
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["perplexity"] = train_utils.perplexity(eval_metrics["eval_loss"])
        train_utils.log_and_save(trainer, "eval", eval_metrics)
        metrics.update(eval_metrics)
    if training_args.should_log:
        start = next((h for h in trainer.state.log_history if h.get("step") == 0 and "eval_loss" in h), None)
        before = f" (untrained: {math.exp(min(start['eval_loss'], 700)):.0f})" if start else ""
        print(f"\nModel saved to {os.path.abspath(training_args.output_dir)}")
        if "perplexity" in metrics:
            print(f"Eval perplexity: {metrics['perplexity']:.1f}{before}, masked-token accuracy: {metrics.get('eval_accuracy', float('nan')):.3f}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
