"""Masked-language-model (BERT-style) pre-training or continued training with the Hugging Face Trainer.

Runnable commands:
    python run_mlm.py                                   # offline demo: tiny BERT, tokenizer trained on the fly,
                                                        # Python's own docs as corpus, about a minute on 2 CPU cores
    python run_mlm.py --model_name_or_path bert-base-uncased --dataset_name Salesforce/wikitext \
        --dataset_config_name wikitext-2-raw-v1 --do_train --do_eval --output_dir out/bert-wikitext
    python run_mlm.py --config_name configs/bert-mini.json --train_file corpus.txt --validation_file dev.txt \
        --max_seq_length 128 --learning_rate 5e-4 --warmup_steps 0.1 --bf16 --output_dir out/bert-mini
    python run_mlm.py config.yaml --learning_rate 1e-4  # flags from a .json/.yaml file, CLI wins
    torchrun --nproc_per_node 2 run_mlm.py ...           # or: accelerate launch run_mlm.py ...

The same command run again resumes from the newest complete checkpoint (without --output_dir the folder is
outputs/<script>-<hash of the settings given>; --overwrite_output_dir starts fresh). Results go to
output_dir/all_results.json; `main(argv)` returns the same dict.
"""

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import evaluate
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForMaskedLM,
    DataCollatorForLanguageModeling,
    TrainingArguments,
    set_seed,
)
from transformers.modeling_outputs import MaskedLMOutput

import data_utils
import packing
import run_folder
import streaming
import throughput
import train_utils
from arguments import DataArguments, ModelArguments, UserError, flags_given, parse_args, run_cli, to_config_dict

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
    source = model_args.config_name or model_args.model_name_or_path
    if source:
        return data_utils.load_pretrained_config(source, model_args)
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


# ADAPT: the tokenizer trained for a from-scratch run (cased, another vocabulary size, BPE, ...).
def train_wordpiece_tokenizer(text_iterator, vocab_size, model_max_length, output_dir=None, lowercase=True):
    """Train a BERT-style WordPiece tokenizer (with [CLS]/[SEP]/[MASK]) on the training text, for from-scratch
    runs that name no tokenizer, so nothing has to be downloaded."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(text_iterator, trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length,
    )
    if output_dir:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


# ADAPT: the masking. Override torch_mask_tokens here (span masking, another replacement scheme, ...).
class FastMLMCollator(DataCollatorForLanguageModeling):
    """transformers' MLM collator, with special tokens found by one vectorized `isin` per batch (no stored
    special_tokens_mask column) and masks drawn from a per-batch seed (data_utils.BatchSeeds), so a resumed run
    masks as the uninterrupted run did."""

    def __init__(self, *args, seed=42, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_seeds = data_utils.BatchSeeds(seed)

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
        if special_tokens_mask is None:
            special_tokens_mask = torch.isin(inputs, torch.tensor(self.tokenizer.all_special_ids, dtype=inputs.dtype))
        seed = int(np.random.SeedSequence(self.batch_seeds.next()).generate_state(1)[0])
        self.generator = torch.Generator().manual_seed(seed)
        return super().torch_mask_tokens(inputs, special_tokens_mask=special_tokens_mask, offset_mapping=offset_mapping)


# ADAPT: the loss, in `forward` below (label smoothing, weighting, another objective on the masked positions).
def enable_sparse_mlm_head(model, label_smoothing=0.0):
    """Replace this model's forward with one that runs the MLM head only at masked positions (as crammed BERT and
    MosaicBERT do): with a 30k vocabulary the output layer costs more than the encoder, yet ~15% of positions
    carry a label. Weights and saved format are untouched. In evaluation `logits` are the argmax ids at labelled
    positions (-100 elsewhere), so metrics never hold full-vocabulary logits; training returns the loss alone,
    with `label_smoothing` applied (evaluation reports the plain cross-entropy, so perplexity is exp of it);
    without labels, ordinary logits. Returns False (changing nothing) when the head is not one module beside
    the encoder."""

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
        # ADAPT: the loss. With gradient accumulation, normalise by the tokens of the whole step.
        smoothing = label_smoothing if model.training else 0.0
        if num_items_in_batch is not None:
            loss = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=smoothing) / num_items_in_batch
        else:
            loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        if model.training:  # the Trainer reads only the loss of a training step; an argmax is ~1.5% of a CPU step
            return MaskedLMOutput(loss=loss)
        predictions = torch.full_like(labels, -100)
        predictions[selected] = logits.argmax(-1)
        return MaskedLMOutput(loss=loss, logits=predictions)

    model.forward = forward
    return True


def main(argv=None):
    # 1. Arguments
    argv = list(sys.argv[1:] if argv is None else argv) or DEMO_ARGS
    model_args, data_args, mlm_args, training_args = parse_args(
        (ModelArguments, DataArguments, MLMArguments, TrainingArguments), argv,
        rules={"max_seq_length": "the model's and tokenizer's limit, at most 1024"})
    given = flags_given(argv)
    train_utils.finalize_training_args(training_args, given)
    if data_args.streaming and training_args.max_steps <= 0:
        raise UserError("--streaming needs --max_steps (a stream has no length to count epochs by)")

    # 2. Logging, seed, tracking
    train_utils.setup_logging(training_args)
    config_dict = to_config_dict(model_args, data_args, mlm_args, training_args)
    resume_from, run_info = run_folder.prepare_output_dir(training_args, data_args, "run_mlm", config_dict, given)
    set_seed(training_args.seed)

    # 3. Datasets
    raw_datasets = data_utils.load_raw_datasets(model_args, data_args)
    column_names = data_utils.column_names(raw_datasets)
    text_column = data_utils.pick_text_column(column_names, mlm_args.text_column_name)

    # 4. Model and tokenizer
    config = load_config(model_args)
    limit = getattr(config, "max_position_embeddings", 1024)
    vocab_size = mlm_args.tokenizer_vocab_size
    # Several processes: the first trains and saves the tokenizer, the others then load that copy.
    with training_args.main_process_first(local=False, desc="tokenizer"):
        tokenizer = data_utils.load_or_train_tokenizer(
            model_args, data_args, training_args.output_dir, raw_datasets.get("train"), text_column,
            f"wordpiece{vocab_size}-{limit}", lambda texts, save_to: train_wordpiece_tokenizer(texts, vocab_size, limit, save_to))
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
        train_utils.logger.info("%s: %.1fM parameters", "Model from config, weights from the checkpoint" if resume_from
                                else "Training from scratch", model.num_parameters() / 1e6)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    sparse_head = mlm_args.sparse_mlm_head and enable_sparse_mlm_head(model, training_args.label_smoothing_factor)

    # 5. Preprocessing
    # ADAPT: the preprocessing, how text becomes training examples (tokenize, then pack or keep lines).
    packed = not mlm_args.line_by_line
    encode = packing.TokenIds(tokenizer)

    def tokenize(batch):  # batch: a pyarrow Table (the data is formatted as "arrow" below)
        texts = packing.non_blank(batch[text_column])  # blank lines carry nothing
        if packed and not (mlm_args.pad_to_max_length or mlm_args.whole_word_mask):
            encoded = encode(texts)  # = tokenizer(texts)'s input_ids, computed faster (no offsets)
        else:
            encoded = tokenizer(
                texts, truncation=mlm_args.line_by_line, max_length=max_seq_length if mlm_args.line_by_line else None,
                padding="max_length" if mlm_args.pad_to_max_length else False, return_attention_mask=False,
                return_token_type_ids=False, return_offsets_mapping=mlm_args.whole_word_mask,
            )
        if not packed:
            return pa.table(dict(encoded))
        # The texts' tokens joined and cut into blocks of exactly max_seq_length: no padding at all; each text
        # keeps its [CLS] ... [SEP].
        return packing.pack_token_ids(encoded, max_seq_length)

    map_args = dict(batched=True, batch_size=10_000, remove_columns=column_names,
                    desc=f"Tokenizing and packing into blocks of {max_seq_length}" if packed else "Tokenizing")
    if not data_args.streaming:
        map_args["num_proc"] = data_args.preprocessing_num_workers
    key = (data_utils.tokenizer_fingerprint(tokenizer), max_seq_length, mlm_args.line_by_line,
           mlm_args.pad_to_max_length, mlm_args.whole_word_mask)
    with training_args.main_process_first(desc="tokenizing"):
        tokenized = data_utils.cached_map(raw_datasets.with_format("arrow"), tokenize, key, model_args.cache_dir,
                                          data_args.overwrite_cache, **map_args).with_format(None)
    if data_args.streaming:  # shards read, tokenized and packed on the fly in each process's workers
        tokenized["train"], held_out = streaming.load_training_stream(
            model_args, data_args, training_args, text_column, tokenize, resume_from, "validation" not in tokenized)
        if held_out is not None:
            tokenized["validation"] = held_out
    train_dataset = data_utils.take_at_most(tokenized["train"] if training_args.do_train else None,
                                            data_args.max_train_samples)
    eval_dataset = data_utils.take_at_most(tokenized["validation"] if training_args.do_eval else None,
                                           data_args.max_eval_samples)
    packing.require_blocks({"train": train_dataset, "validation": eval_dataset}, raw_datasets, text_column,
                           tokenizer, data_args, max_seq_length)

    # 6. Collator and metrics
    # ADAPT: the masking settings (FastMLMCollator above) and the metrics (compute_metrics).
    collator = FastMLMCollator(
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
    trainer_class = streaming.ResumableStreamTrainer if data_args.streaming else train_utils.IsolatedEvalTrainer
    trainer = trainer_class(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=argmax_logits if training_args.do_eval else None,
    )
    if sparse_head:  # it smooths the labels itself, at the masked positions only, and keeps its speed
        trainer.label_smoother = None
    flops = throughput.transformer_flops_per_token(
        model, max_seq_length, head_fraction=mlm_args.mlm_probability if sparse_head else 1.0)
    peak = throughput.peak_flops(training_args, model_args.peak_tflops)
    train_utils.prepare_trainer(trainer, config_dict, flops, peak, run_info)

    # 8. Train
    metrics = {}
    if training_args.do_train:
        result = train_utils.train(trainer, resume_from)
        trainer.save_model()  # model, config and tokenizer, loadable with from_pretrained
        train_metrics = dict(result.metrics, peak_memory_mb=round(throughput.peak_memory_mb(), 1))
        if not data_args.streaming:
            train_metrics["train_samples"] = len(train_dataset)
        train_utils.log_and_save(trainer, "train", train_metrics)
        metrics.update(train_metrics)

    # 9. Evaluate and save
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["perplexity"] = math.exp(eval_metrics["eval_loss"]) if eval_metrics["eval_loss"] < 700 else float("inf")
        train_utils.log_and_save(trainer, "eval", eval_metrics)
        metrics.update(eval_metrics)
    run_folder.mark_finished(training_args)
    if training_args.should_log:
        start = next((h for h in trainer.state.log_history if h.get("step") == 0 and "eval_loss" in h), None)
        before = f" (untrained: {math.exp(min(start['eval_loss'], 700)):.0f})" if start else ""
        print(f"\nModel saved to {os.path.abspath(training_args.output_dir)}")
        if "perplexity" in metrics:
            print(f"Eval perplexity: {metrics['perplexity']:.1f}{before}, masked-token accuracy: {metrics.get('eval_accuracy', float('nan')):.3f}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
