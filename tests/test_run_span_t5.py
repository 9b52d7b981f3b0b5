"""run_span_t5.py end to end, in-process, on tiny fixtures and a tiny T5 v1.1 built from a config."""

import io
import json
import logging
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

import run_mlm
import run_span_t5
import span_corruption
import throughput
from arguments import UserError
from conftest import ROOT, shared_path

TINY_T5 = [
    "--model_type=t5",
    "--config_overrides=d_model=32,d_kv=16,num_heads=2,d_ff=64,num_layers=1,feed_forward_proj=gated-gelu,"
    "tie_word_embeddings=false",
    "--tokenizer_vocab_size=300",
    "--max_seq_length=32",
    "--per_device_train_batch_size=4",
    "--per_device_eval_batch_size=4",
    "--report_to=none",
    "--disable_tqdm=True",
    "--logging_steps=1",
]
RAW_LENGTH, TARGET_LENGTH = span_corruption.compute_t5_input_and_target_lengths(32)


def run(tmp_path, corpus, *extra, name="out"):
    args = [*TINY_T5, f"--output_dir={tmp_path / name}", "--max_steps=4", "--save_steps=2", "--max_eval_samples=8",
            f"--train_file={corpus / 'train.txt'}", f"--validation_file={corpus / 'validation.txt'}"]
    return run_span_t5.main(args + list(extra))


def test_tiny_run_results_fixed_shapes_and_auto_reload(tmp_path, text_corpus, monkeypatch):
    shapes = set()
    collate = span_corruption.DataCollatorForT5SpanCorruption.__call__

    def spy(self, examples):
        batch = collate(self, examples)
        shapes.add(tuple((key, value.shape[1]) for key, value in sorted(batch.items())))
        return batch

    monkeypatch.setattr(span_corruption.DataCollatorForT5SpanCorruption, "__call__", spy)
    metrics = run(tmp_path, text_corpus)
    out = tmp_path / "out"
    saved = json.loads((out / "all_results.json").read_text())
    assert math.isfinite(saved["eval_loss"]) and 0.0 <= saved["eval_accuracy"] <= 1.0
    assert saved["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    # Packed rows of RAW_LENGTH corrupt to exactly 32 encoder and TARGET_LENGTH decoder tokens in every batch.
    assert shapes == {(("decoder_input_ids", TARGET_LENGTH), ("input_ids", 32), ("labels", TARGET_LENGTH))}

    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (model.config.d_model, model.config.num_layers, model.config.dropout_rate) == (32, 1, 0.0)
    assert model.config.is_gated_act and not model.config.scale_decoder_outputs  # T5 v1.1
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()  # its own output layer, also reloaded
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1
    batch = span_corruption.DataCollatorForT5SpanCorruption(tokenizer, input_length=32, seed=0)(
        [list(range(5, 5 + RAW_LENGTH))] * 2)
    with torch.no_grad():
        assert math.isfinite(model(**batch).loss.item())


def test_streaming_needs_max_steps_and_runs(tmp_path, text_corpus):
    with pytest.raises(UserError, match="--max_steps"):
        run_span_t5.main([*TINY_T5, f"--output_dir={tmp_path / 'x'}", "--streaming", f"--train_file={text_corpus / 'train.txt'}"])
    metrics = run(tmp_path, text_corpus, "--streaming", "--max_steps=2", "--save_strategy=no")
    assert math.isfinite(metrics["eval_loss"]) and 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_tokenizer_reused_and_tokenized_data_cached(tmp_path, text_corpus, caplog):
    caplog.set_level(logging.INFO)
    run(tmp_path, text_corpus, "--overwrite_cache", "--max_steps=1", name="a")
    assert "Saved tokenized data to cache" in caplog.text
    caplog.clear()
    run(tmp_path, text_corpus, "--max_steps=1", name="b")  # a new output_dir: a sweep's next trial
    assert (tmp_path / "b" / "tokenizer.json").read_text() == (tmp_path / "a" / "tokenizer.json").read_text()
    assert "Loaded tokenized data from cache" in caplog.text
    assert "Saved tokenized data to cache" not in caplog.text


@pytest.mark.parametrize("optimizer, lr, schedule", [
    ("adamw", 5e-05, "linear"), ("adafactor", 1e-2, "linear"), ("adamwscale", 2e-2, "cosine"),
])
def test_each_optimizer_trains_with_its_recipe_defaults(tmp_path, text_corpus, optimizer, lr, schedule):
    metrics = run(tmp_path, text_corpus, f"--t5_optimizer={optimizer}", "--max_steps=2", "--save_strategy=no")
    assert math.isfinite(metrics["eval_loss"])
    config = json.loads((tmp_path / "out" / "run_info.json").read_text())["config"]
    assert (config["learning_rate"], config["lr_scheduler_type"]) == (lr, schedule)


def test_flags_given_by_the_user_win(tmp_path, text_corpus):
    run(tmp_path, text_corpus, "--t5_optimizer=adamwscale", "--learning_rate=3e-3", "--lr_scheduler_type=constant",
        "--dropout_rate=0.1", "--max_steps=1", "--save_strategy=no", "--do_train")
    config = json.loads((tmp_path / "out" / "run_info.json").read_text())["config"]
    assert (config["learning_rate"], config["lr_scheduler_type"]) == (3e-3, "constant")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dropout_rate"] == 0.1


def test_recipe_defaults_see_flags_in_a_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("t5_optimizer: adamwscale\nlearning_rate: 0.005\n")
    assert {"t5_optimizer", "learning_rate", "output_dir"} <= run_span_t5.flags_given([str(config), "--output_dir=x"])
    assert run_span_t5.flags_given(["--config_name=configs/t5-tiny.json"]) == {"config_name"}


def test_bf16_trains(tmp_path, text_corpus):
    metrics = run(tmp_path, text_corpus, "--bf16", "--max_steps=2", "--save_strategy=no")
    assert math.isfinite(metrics["eval_loss"])


def test_dataloader_workers_collate(tmp_path, text_corpus):
    """What a GPU run does by default: the collator runs in two DataLoader worker processes."""
    metrics = run(tmp_path, text_corpus, "--dataloader_num_workers=2", "--max_steps=2", "--save_strategy=no")
    assert math.isfinite(metrics["eval_loss"])


def test_adamwscale_resumes_from_checkpoint(tmp_path, text_corpus, caplog):
    caplog.set_level(logging.INFO)
    run(tmp_path, text_corpus, "--t5_optimizer=adamwscale", "--do_train")
    caplog.clear()
    run(tmp_path, text_corpus, "--t5_optimizer=adamwscale", "--max_steps=6", "--do_train")
    assert "Resuming from" in caplog.text and "checkpoint-4" in caplog.text
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 6
    # The optimizer state came back with the checkpoint: its step count went on from 4.
    state = torch.load(tmp_path / "out" / "checkpoint-6" / "optimizer.pt", weights_only=True)["state"]
    assert {int(entry["step"]) for entry in state.values()} == {6}


def test_adamwscale_is_adamw_with_rms_scaled_steps():
    torch.manual_seed(0)
    big, tiny = torch.randn(64, 32) * 0.5, torch.zeros(16)  # RMS ~0.5, and 0 (scaled by the floor 1e-3)
    grads = [torch.randn_like(big), torch.randn_like(tiny)]
    deltas = {}
    for name, cls in [("adamw", torch.optim.AdamW), ("scaled", run_span_t5.AdamWScale)]:
        params = [torch.nn.Parameter(big.clone()), torch.nn.Parameter(tiny.clone())]
        optimizer = cls(params, lr=1e-2, weight_decay=0.0)
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
        deltas[name] = [param.detach() - start for param, start in zip(params, (big, tiny))]
    rms = big.square().mean().sqrt()
    torch.testing.assert_close(deltas["scaled"][0], deltas["adamw"][0] * rms)
    torch.testing.assert_close(deltas["scaled"][1], deltas["adamw"][1] * 1e-3)


def test_adamwscale_fused_and_float32_fallback_give_the_same_steps():
    # float32 weights take torch's fused kernel; other dtypes the element-wise fallback: same update rule.
    torch.manual_seed(0)
    start, grads = torch.randn(32, 16) * 0.3, [torch.randn(32, 16) for _ in range(5)]
    results = {}
    for dtype in (torch.float32, torch.float64):
        param = torch.nn.Parameter(start.to(dtype, copy=True))
        optimizer = run_span_t5.AdamWScale([param], lr=1e-2, weight_decay=0.1)
        for grad in grads:
            param.grad = grad.to(dtype)
            optimizer.step()
        results[dtype] = param.detach().float()
    assert not torch.allclose(results[torch.float32], start, atol=1e-3)  # the steps moved the weights
    torch.testing.assert_close(results[torch.float32], results[torch.float64], rtol=1e-5, atol=1e-6)


def test_adamwscale_state_dict_round_trips():
    torch.manual_seed(0)
    weights = torch.randn(8, 8)

    def make():
        param = torch.nn.Parameter(weights.clone())
        return param, run_span_t5.AdamWScale([param], lr=1e-2, weight_decay=0.1)

    (first, first_opt), (second, second_opt) = make(), make()
    for _ in range(3):
        first.grad = torch.randn(8, 8)
        first_opt.step()
    second.data.copy_(first.data)
    buffer = io.BytesIO()  # through a file, as the Trainer's checkpoints do (no tensors shared with `first`)
    torch.save(first_opt.state_dict(), buffer)
    buffer.seek(0)
    second_opt.load_state_dict(torch.load(buffer, weights_only=True))
    first.grad = second.grad = torch.ones(8, 8)
    first_opt.step()
    second_opt.step()
    torch.testing.assert_close(first, second)


def test_fp16_is_refused(tmp_path, text_corpus):
    with pytest.raises(UserError, match="--fp16: T5 overflows.*use --bf16"):
        run(tmp_path, text_corpus, "--fp16")


@pytest.mark.parametrize("density", ["0", "1", "1.5", "-0.1"])
def test_noise_density_outside_0_1_is_refused(tmp_path, density):
    with pytest.raises(UserError, match="--noise_density must be between 0 and 1"):
        run_span_t5.main([*TINY_T5, f"--noise_density={density}", f"--output_dir={tmp_path}"])


def test_tokenizer_without_sentinels_is_one_clear_error(tmp_path, text_corpus):
    lines = (text_corpus / "train.txt").read_text().splitlines()
    bert = tmp_path / "bert-tokenizer"
    run_mlm.train_wordpiece_tokenizer([lines], 200, 128, output_dir=str(bert))
    with pytest.raises(UserError) as error:
        run(tmp_path, text_corpus, f"--tokenizer_name={bert}")
    message = str(error.value)
    assert "no <extra_id_0> sentinel token" in message and "--tokenizer_name of a T5 tokenizer" in message
    assert "\n" not in message
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_presets_are_t5_v1_1():
    for name in ("t5-tiny", "t5-small"):
        config = AutoConfig.from_pretrained(f"{ROOT}/configs/{name}.json")
        assert config.is_gated_act and config.dense_act_fn == "gelu_new"
        assert not config.scale_decoder_outputs and config.dropout_rate == 0.0
    small = T5ForConditionalGeneration(AutoConfig.from_pretrained(f"{ROOT}/configs/t5-small.json"))
    run_span_t5.untie_output_layer(small)
    assert small.num_parameters() == 76_961_152  # google/t5-v1_1-small's size


def test_flops_per_token_matches_counted_matmuls():
    """The analytic count against torch's FLOP counter on one forward and backward pass."""
    config = T5Config(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, vocab_size=512,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config)
    n, t = 128, span_corruption.compute_t5_input_and_target_lengths(128)[1]
    batch = {"input_ids": torch.randint(3, 512, (2, n)), "labels": torch.randint(3, 512, (2, t))}
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    estimate = throughput.encoder_decoder_flops_per_token(model, n, t) * n * 2
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.05)


@pytest.mark.slow
def test_wikitext_loss_falls_well_below_untrained(tmp_path):
    data = shared_path("data", "wikitext-2-raw")
    metrics = run_span_t5.main([
        f"--config_name={ROOT}/configs/t5-tiny.json", "--tokenizer_vocab_size=4000",
        f"--train_file={data}/wiki.test.raw", f"--validation_file={data}/wiki.valid.raw",
        "--max_seq_length=64", "--per_device_train_batch_size=32", "--per_device_eval_batch_size=64",
        "--max_eval_samples=256", "--max_steps=150", "--t5_optimizer=adamwscale", "--warmup_steps=15",
        "--eval_on_start", "--seed=42", "--logging_steps=50", "--save_strategy=no", "--report_to=none",
        "--disable_tqdm=True", f"--output_dir={tmp_path / 'wiki'}",
    ])
    history = json.loads((tmp_path / "wiki" / "trainer_state.json").read_text())["log_history"]
    initial = next(h["eval_loss"] for h in history if h["step"] == 0 and "eval_loss" in h)
    final = metrics["eval_loss"]
    print(f"wikitext span-corruption eval loss: {initial:.3f} at step 0 -> {final:.3f} after 150 steps, "
          f"accuracy {metrics['eval_accuracy']:.3f}")
    assert final < 0.6 * initial


def test_saved_config_says_the_output_layer_is_untied_and_reloads_the_same_weights(tmp_path, text_corpus):
    """T5 v1.1 has its own output layer; the saved config.json says so (tie_word_embeddings false, as T5 v1.1's
    and configs/t5-tiny.json do; it used to say true), and the model reloads with both matrices as trained."""
    from safetensors.torch import load_file

    run(tmp_path, text_corpus)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert not model.config.scale_decoder_outputs
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])
    assert torch.equal(model.shared.weight, weights["shared.weight"]) and model.encoder.embed_tokens.weight is model.shared.weight
    assert not torch.equal(weights["lm_head.weight"], weights["shared.weight"])
