"""T5 span-corruption pre-training (Raffel et al. 2020) or continued pre-training with the Hugging Face Trainer.

Runnable commands:
    python run_span_t5.py                               # offline demo: tiny T5 v1.1, Unigram tokenizer trained on
                                                        # the fly, Python's own docs as corpus, under a minute on 2 CPU cores
    python run_span_t5.py --config_name configs/t5-small.json --dataset_name Salesforce/wikitext \
        --dataset_config_name wikitext-103-raw-v1 --max_seq_length 512 --per_device_train_batch_size 128 \
        --t5_optimizer adamwscale --learning_rate 2e-2 --warmup_steps 10000 --max_steps 65536 --bf16 --output_dir out/t5-small
    python run_span_t5.py --model_name_or_path google/t5-v1_1-small --train_file corpus.txt --validation_file dev.txt \
        --t5_optimizer adafactor --learning_rate 1e-3 --lr_scheduler_type constant --bf16 --output_dir out/t5-cont
    python run_span_t5.py --model_type t5 --train_file corpus.txt --output_dir out/t5-custom \
        --config_overrides "d_model=256,d_ff=512,num_layers=4,feed_forward_proj=gated-gelu,tie_word_embeddings=false"
    python run_span_t5.py config.yaml --learning_rate 1e-2  # flags from a .json/.yaml file, CLI wins
    torchrun --nproc_per_node 2 run_span_t5.py ...       # or: accelerate launch run_span_t5.py ...

The same command run again resumes from the newest complete checkpoint (without --output_dir the folder is
outputs/<script>-<hash of the settings given>; --overwrite_output_dir starts fresh). Results go to
output_dir/all_results.json; `main(argv)` returns the same dict.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import evaluate
import torch
import transformers
from transformers import CONFIG_MAPPING, AutoModelForSeq2SeqLM, TrainingArguments, set_seed
from transformers.optimization import Adafactor
from transformers.trainer_utils import SchedulerType

import data_utils
import packing
import run_folder
import streaming
import throughput
import train_utils
from arguments import DataArguments, ModelArguments, UserError, flags_given, parse_args, run_cli, to_config_dict
from span_corruption import DataCollatorForT5SpanCorruption, train_t5_unigram_tokenizer

if int(transformers.__version__.split(".")[0]) < 5:
    sys.exit("run_span_t5.py needs transformers 5.x: pip install -r requirements.txt")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "t5-tiny.json")
# `python run_span_t5.py` with no arguments: a from-scratch run sized to finish in a few minutes on a laptop CPU.
DEMO_ARGS = [
    "--max_seq_length=128", "--per_device_train_batch_size=16", "--tokenizer_vocab_size=4000", "--t5_optimizer=adamwscale",
    "--warmup_steps=0.05", "--num_train_epochs=3", "--logging_steps=20", "--eval_on_start", "--save_steps=100",
    "--save_total_limit=2",
]
# Learning rates of the recipes behind --t5_optimizer, used when --learning_rate is not given: T5's Adafactor rate
# (0.01, held for the first 10^4 steps; Raffel et al. 2020, 3.1.2) and nanoT5's peak rate for AdamW with scaled steps.
RECIPE_LEARNING_RATES = {"adafactor": 1e-2, "adamwscale": 2e-2}


@dataclass
class SpanT5Arguments:
    text_column_name: Optional[str] = field(
        default=None, metadata={"help": "Column holding the text (default: 'text', else the first column)."}
    )
    noise_density: float = field(default=0.15, metadata={"help": "Share of tokens to mask (T5: 0.15)."})
    mean_noise_span_length: float = field(default=3.0, metadata={"help": "Mean length of a masked span (T5: 3)."})
    tokenizer_vocab_size: int = field(
        default=8000,
        metadata={"help": "Learned vocabulary of the Unigram tokenizer trained when no tokenizer is given; 100 "
                          "sentinels come on top (T5: 32000)."},
    )
    t5_optimizer: str = field(
        default="adamw",
        metadata={"help": "adamw: the Trainer's (--optim); adafactor: T5's (constant-step, unscaled; lr 1e-2); "
                          "adamwscale: nanoT5's AdamW with RMS-scaled steps (lr 2e-2, cosine decay).",
                  "choices": ["adamw", "adafactor", "adamwscale"]},
    )
    dropout_rate: Optional[float] = field(
        default=None,
        metadata={"help": "Dropout. Default: 0 from scratch (T5 v1.1 pre-trains without), a pretrained model's own."},
    )

    def __post_init__(self):
        if not 0.0 < self.noise_density < 1.0:
            raise UserError("--noise_density must be between 0 and 1 (T5 uses 0.15)")
        if self.mean_noise_span_length < 1.0:
            raise UserError("--mean_noise_span_length must be at least 1 (T5 uses 3)")
        if self.dropout_rate is not None and not 0.0 <= self.dropout_rate < 1.0:
            raise UserError("--dropout_rate must be in [0, 1)")


class AdamWScale(torch.optim.Optimizer):
    """AdamW whose step for each weight tensor is multiplied by max(1e-3, RMS(tensor)).

    The scaling is Adafactor's "relative step size" (Shazeer & Stern 2018, section 8): a step moves each tensor
    by a fixed fraction of its own size. nanoT5 (Nawrot 2023) found that AdamW needs it to pre-train T5 as
    well as Adafactor does in PyTorch, with lr 2e-2 and cosine decay. Weight decay is decoupled and unscaled.
    """

    def __init__(self, params, lr=2e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    # `step` as a float tensor, as torch's own Adam kernels keep it
                    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                state["step"] += 1
                # The tensor's RMS before this step. A tensor, not .item(): no device sync per parameter.
                rms = torch.linalg.vector_norm(param.float()) / param.numel() ** 0.5
                lr = rms.clamp_min_(1e-3).mul_(group["lr"])
                if group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, and not scaled
                if param.dtype == torch.float32:
                    # torch's fused AdamW kernel (the one --optim adamw_torch_fused runs) with the scaled step size:
                    # one pass over each tensor instead of a dozen element-wise ops with temporaries (3x faster).
                    torch._fused_adamw_([param], [param.grad], [state["exp_avg"]], [state["exp_avg_sq"]], [],
                                        [state["step"]], lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0,
                                        eps=group["eps"], amsgrad=False, maximize=False)
                    continue
                # Lower-precision weights: the same update, computed in float32.
                grad, exp_avg, exp_avg_sq = param.grad.float(), state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
                update = exp_avg.div(denom).mul_(lr / (1 - beta1 ** state["step"]))
                param.sub_(update.to(param.dtype))
        return loss


RUN_DEFAULT_RULES = {  # what --help shows for the defaults apply_run_defaults sets
    "learning_rate": "1e-2 with --t5_optimizer adafactor, 2e-2 with adamwscale, else 5e-5",
    "lr_scheduler_type": "cosine with --t5_optimizer adamwscale, else linear",
    "dataloader_num_workers": "2 on a GPU, else 0",
    "max_seq_length": "the tokenizer's limit, at most 512",
}


def apply_run_defaults(t5_args, training_args, given):
    """Defaults of this recipe for the flags the user did not set (RUN_DEFAULT_RULES says them in --help)."""
    if t5_args.t5_optimizer in RECIPE_LEARNING_RATES and "learning_rate" not in given:
        training_args.learning_rate = RECIPE_LEARNING_RATES[t5_args.t5_optimizer]
    if t5_args.t5_optimizer == "adamwscale" and "lr_scheduler_type" not in given:
        training_args.lr_scheduler_type = SchedulerType.COSINE  # nanoT5's schedule for this optimizer
    if torch.cuda.is_available() and "dataloader_num_workers" not in given:
        # Span corruption takes about half a millisecond a 32 x 512 batch on a CPU core (benchmarks/t5_collator.py):
        # workers do it while the GPU computes, instead of the training process between steps.
        training_args.dataloader_num_workers = 2


def load_optimizer(t5_args, training_args):
    """(class, kwargs) for Trainer(optimizer_cls_and_kwargs=...): the Trainer still builds the parameter groups
    (no decay on norms) and the scheduler. None keeps the Trainer's own optimizer (--optim)."""
    if t5_args.t5_optimizer == "adafactor":
        # A fixed step size from --learning_rate, not Adafactor's own relative schedule: T5's pre-training set-up.
        return Adafactor, dict(lr=training_args.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    if t5_args.t5_optimizer == "adamwscale":
        return AdamWScale, dict(lr=training_args.learning_rate, betas=(training_args.adam_beta1, training_args.adam_beta2),
                                eps=training_args.adam_epsilon)
    return None


def load_config(model_args):
    source = model_args.config_name or model_args.model_name_or_path
    if source:
        return data_utils.load_pretrained_config(source, model_args)
    if model_args.model_type:
        if model_args.model_type not in CONFIG_MAPPING:
            raise UserError(f"unknown --model_type {model_args.model_type!r}; use e.g. t5, mt5, umt5")
        config_class, settings = CONFIG_MAPPING[model_args.model_type], {}
    else:
        with open(DEFAULT_CONFIG, encoding="utf-8") as f:
            settings = json.load(f)
        config_class = CONFIG_MAPPING[settings.pop("model_type")]
    if model_args.config_overrides:
        probe = config_class(**settings)
        try:
            probe.update_from_string(model_args.config_overrides)  # checks the keys, converts the values' types
        except ValueError as err:
            raise UserError(f"--config_overrides: {err}; see the model's config class for valid keys")
        settings.update({k: getattr(probe, k) for k in (item.split("=")[0] for item in model_args.config_overrides.split(","))})
    # T5Config derives the FFN activation (feed_forward_proj) and the output scaling (tie_word_embeddings) when it
    # is built, not when a field changes afterwards: so every value goes to the constructor.
    return config_class(**settings)


def untie_output_layer(model):
    """Give the model its own output layer, as T5 v1.1 has.

    transformers 5 ties T5's lm_head to the input embedding whatever the config says and reads
    tie_word_embeddings=false only as "do not scale the decoder output" (huggingface/transformers#42815).
    A checkpoint holding two different matrices still reloads untied. std d_model**-0.5 (fan-in) starts the
    logits at unit scale, so the untrained loss is about ln(vocab) instead of sqrt(d_model) times too sharp.
    """
    weight = torch.empty_like(model.lm_head.weight).normal_(std=model.config.d_model**-0.5)
    model.lm_head.weight = torch.nn.Parameter(weight)
    # Saved configs then say what the weights are, as T5 v1.1's do; transformers 5 reads the flag back as
    # scale_decoder_outputs=false (and still warns once on loading that lm_head and the embedding differ).
    model.config.tie_word_embeddings = False


def main(argv=None):
    # 1. Arguments
    argv = list(sys.argv[1:] if argv is None else argv) or DEMO_ARGS
    model_args, data_args, t5_args, training_args = parse_args(
        (ModelArguments, DataArguments, SpanT5Arguments, TrainingArguments), argv, rules=RUN_DEFAULT_RULES)
    given = flags_given(argv)
    train_utils.finalize_training_args(training_args, given)
    apply_run_defaults(t5_args, training_args, given)
    if data_args.streaming and training_args.max_steps <= 0:
        raise UserError("--streaming needs --max_steps (a stream has no length to count epochs by)")
    if training_args.fp16:
        raise UserError("--fp16: T5 overflows in float16 (activations pass 65504 and the loss turns NaN); use --bf16 or fp32")

    # 2. Logging, seed, tracking
    train_utils.setup_logging(training_args)
    config_dict = to_config_dict(model_args, data_args, t5_args, training_args)
    resume_from, run_info = run_folder.prepare_output_dir(training_args, data_args, "run_span_t5", config_dict, given)
    set_seed(training_args.seed)

    # 3. Datasets
    raw_datasets = data_utils.load_raw_datasets(model_args, data_args)
    column_names = data_utils.column_names(raw_datasets)
    text_column = data_utils.pick_text_column(column_names, t5_args.text_column_name)

    # 4. Model and tokenizer
    config = load_config(model_args)
    if not getattr(config, "is_encoder_decoder", False):
        raise UserError(f"span corruption needs an encoder-decoder model (t5, mt5, umt5), not {config.model_type!r}")
    vocab_size = t5_args.tokenizer_vocab_size
    # Several processes: the first trains and saves the tokenizer, the others then load that copy.
    with training_args.main_process_first(local=False, desc="tokenizer"):
        tokenizer = data_utils.load_or_train_tokenizer(
            model_args, data_args, training_args.output_dir, raw_datasets.get("train"), text_column, f"t5unigram{vocab_size}",
            lambda texts, save_to: train_t5_unigram_tokenizer(texts, vocab_size, output_dir=save_to))
    # T5's relative position buckets set no hard limit; 512 is the length T5 was pre-trained with.
    max_seq_length = data_args.max_seq_length or min(tokenizer.model_max_length, 512)
    try:  # built now, so that a tokenizer without sentinels fails before anything is tokenized
        collator = DataCollatorForT5SpanCorruption(  # ADAPT: the noising objective (span_corruption.py)
            tokenizer, t5_args.noise_density, t5_args.mean_noise_span_length, input_length=max_seq_length,
            decoder_start_token_id=getattr(config, "decoder_start_token_id", None), seed=training_args.seed,
        )
    except ValueError as err:
        if "sentinel" not in str(err):
            raise UserError(f"--max_seq_length {max_seq_length}: {err}") from err
        raise UserError(f"{str(err).split(';')[0]}; pass --tokenizer_name of a T5 tokenizer (e.g. google-t5/t5-small), "
                        "or leave it out to train one with sentinels") from err
    if t5_args.dropout_rate is not None:
        config.dropout_rate = t5_args.dropout_rate
    elif not model_args.model_name_or_path and "dropout_rate" not in (model_args.config_overrides or ""):
        config.dropout_rate = 0.0  # T5 v1.1 pre-trains without dropout: one pass over the data does not overfit
    if model_args.model_name_or_path:
        model = AutoModelForSeq2SeqLM.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
            token=model_args.token, trust_remote_code=model_args.trust_remote_code, dtype=model_args.dtype,
        )
    else:
        config.vocab_size = -(-len(tokenizer) // 128) * 128  # as T5's 32100 -> 32128: matmul-friendly width
        config.pad_token_id = config.decoder_start_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        model = AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        if getattr(config, "scale_decoder_outputs", True) is False:
            untie_output_layer(model)
        train_utils.logger.info("%s: %.1fM parameters", "Model from config, weights from the checkpoint" if resume_from
                                else "Training from scratch", model.num_parameters() / 1e6)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    raw_length, target_length = collator.raw_length, collator.target_length

    # 5. Preprocessing. ADAPT: how text becomes training examples.
    encode = packing.TokenIds(tokenizer)

    def tokenize_and_pack(batch):  # batch: a pyarrow Table (the data is formatted as "arrow" below)
        texts = packing.non_blank(batch[text_column])  # blank lines carry nothing
        # T5 tokenizers end every text with </s>, so packed documents stay apart.
        encoded = encode(texts)  # = tokenizer(texts)'s input_ids, computed faster (no offsets)
        # Rows of exactly raw_length tokens, which span corruption turns into max_seq_length encoder and
        # target_length decoder tokens: fixed shapes, no padding anywhere.
        return packing.pack_token_ids(encoded, raw_length)

    if tokenizer("a")["input_ids"][-1] != tokenizer.eos_token_id:
        train_utils.logger.warning("The tokenizer does not end texts with %s: packed documents run into each other",
                                   tokenizer.eos_token)
    map_args = dict(batched=True, batch_size=10_000, remove_columns=column_names,
                    desc=f"Tokenizing and packing into rows of {raw_length}")
    if not data_args.streaming:
        map_args["num_proc"] = data_args.preprocessing_num_workers
    key = (data_utils.tokenizer_fingerprint(tokenizer), "pack", raw_length)
    with training_args.main_process_first(desc="tokenizing"):
        # numpy rows reach the collator as arrays: one np.stack per batch instead of converting Python ints.
        tokenized = data_utils.cached_map(raw_datasets.with_format("arrow"), tokenize_and_pack, key, model_args.cache_dir,
                                          data_args.overwrite_cache, **map_args).with_format("numpy")
    if data_args.streaming:  # shards read, tokenized and packed on the fly in each process's workers
        tokenized["train"], held_out = streaming.load_training_stream(
            model_args, data_args, training_args, text_column, tokenize_and_pack, resume_from, "validation" not in tokenized)
        if held_out is not None:
            tokenized["validation"] = held_out
    train_dataset = data_utils.take_at_most(tokenized["train"] if training_args.do_train else None,
                                            data_args.max_train_samples)
    eval_dataset = data_utils.take_at_most(tokenized["validation"] if training_args.do_eval else None,
                                           data_args.max_eval_samples)
    packing.require_blocks({"train": train_dataset, "validation": eval_dataset}, raw_datasets, text_column,
                           tokenizer, data_args, f"{raw_length} (the text that corrupts to --max_seq_length {max_seq_length})")

    # 6. Collator and metrics. ADAPT: what is measured.
    accuracy = evaluate.load(os.path.join(HERE, "metrics", "mlm_accuracy"))

    def argmax_logits(logits, labels):  # keep token ids, never full-vocabulary logits
        logits = logits[0] if isinstance(logits, tuple) else logits  # (logits, encoder states)
        return logits.argmax(dim=-1)

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
        optimizer_cls_and_kwargs=load_optimizer(t5_args, training_args),  # ADAPT: the optimizer
    )
    # The Trainer counts encoder input tokens (input_ids), so FLOPs are per input token, decoder work included.
    flops = throughput.encoder_decoder_flops_per_token(model, max_seq_length, target_length)
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
        train_utils.log_and_save(trainer, "eval", eval_metrics)
        metrics.update(eval_metrics)
    run_folder.mark_finished(training_args)
    if training_args.should_log:
        start = next((h for h in trainer.state.log_history if h.get("step") == 0 and "eval_loss" in h), None)
        before = f" (untrained: {start['eval_loss']:.2f})" if start else ""
        print(f"\nModel saved to {os.path.abspath(training_args.output_dir)}")
        if "eval_loss" in metrics:
            print(f"Eval loss: {metrics['eval_loss']:.2f}{before}, target-token accuracy: {metrics.get('eval_accuracy', float('nan')):.3f}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
