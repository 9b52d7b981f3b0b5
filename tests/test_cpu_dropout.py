"""train_utils.use_cpu_dropout: dropout with masks from 15-bit random numbers on a CPU, the same law as torch's,
and the attention functions we register with transformers keeping the padding mask."""

import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

import train_utils
from conftest import ROOT


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_keeps_its_share_scales_and_reproduces(p):
    x = torch.ones(2_000_001, requires_grad=True)  # odd: the last element takes half of a 32-bit draw
    torch.manual_seed(0)
    y = train_utils.cpu_dropout(x, p)
    kept = y != 0
    dropped = round(p * 32768) / 32768
    # 2M elements: the share kept is within 4 standard deviations of 1 - p.
    assert abs(kept.double().mean().item() - (1 - dropped)) < 4 * (p * (1 - p) / x.numel()) ** 0.5
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - dropped)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes where the mask kept, scaled alike
    torch.manual_seed(0)
    assert torch.equal(train_utils.cpu_dropout(x, p), y)  # the global seed decides the mask
    assert not torch.equal(train_utils.cpu_dropout(x, p), y)
    assert train_utils.cpu_dropout(x, p, training=False) is x
    torch.manual_seed(0)
    assert torch.equal(train_utils.cpu_dropout(x.detach().bfloat16(), p) != 0, kept)  # the mask is not the dtype's


def _model(name, dropout=0.1):
    config = AutoConfig.from_pretrained(os.path.join(ROOT, "configs", f"{name}.json"))
    config.vocab_size = 1000
    if name.startswith("t5"):
        config.dropout_rate = dropout  # pre-training presets have none; fine-tuned T5 checkpoints do
    else:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    cls = AutoModelForSeq2SeqLM if name.startswith("t5") else AutoModelForMaskedLM
    torch.manual_seed(0)
    return cls.from_config(config)


def _batch(name):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (3, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # padding: must not change what the other positions see
    mask[2, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids[:, :9].contiguous() if name.startswith("t5") else ids}
    return batch


@pytest.mark.parametrize("name", ["bert-tiny", "t5-tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_cpu_dropout_is_sdpa_attention_with_its_mask(name, dtype, monkeypatch):
    """With every mask element kept, a training step through use_cpu_dropout's attention and dropout layers gives
    SDPA's loss and gradients without dropout: scaling, padding mask and T5's position bias all taken alike."""
    batch = _batch(name)
    reference = _model(name, dropout=0.0)
    model = _model(name)
    assert train_utils.use_cpu_dropout(model)[1] and model.config._attn_implementation == train_utils.CPU_DROPOUT_ATTENTION
    calls = []

    def keep_all(shape, p):
        calls.append(p)
        return torch.ones(shape, dtype=torch.bool), 1.0

    monkeypatch.setattr(train_utils, "_keep_mask", keep_all)
    losses = []
    for m in (reference, model):
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = m(**batch).loss
        loss.backward()
        losses.append(loss)
    assert calls and all(p == 0.1 for p in calls)  # our dropout ran, in the attention too
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(losses[1], losses[0], **tolerance)
    pairs = [(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()) if q.grad is not None]
    if dtype == torch.float32:
        for ours, theirs in pairs:
            torch.testing.assert_close(ours, theirs, **tolerance)
    else:  # bf16 rounds in a different order in each; a wrong mask or scale is off by far more
        ours, theirs = (torch.cat([g.flatten() for g in grads]) for grads in zip(*pairs))
        assert (ours - theirs).norm() <= 0.02 * theirs.norm()


@pytest.mark.parametrize("name", ["bert-tiny", "t5-tiny"])
@pytest.mark.parametrize("install", ["bf16_attention_through_fp32", "use_cpu_dropout"])
def test_our_attention_functions_keep_the_padding_mask(name, install):
    """transformers builds no attention mask for an attention function it does not know, unless a mask function
    is registered with it: then padding tokens were attended to."""
    model = _model(name).eval()
    getattr(train_utils, install)(model)
    assert model.config._attn_implementation != "sdpa"
    batch = _batch(name)
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][1, 15:] = 7  # different tokens where the mask says padding
    unmasked = torch.ones_like(batch["attention_mask"])
    with torch.no_grad():
        first, second = model(**batch).logits, model(**other).logits
        # The changed tokens do matter where the mask lets them through, so the equality below can fail.
        seen_first = model(**dict(batch, attention_mask=unmasked)).logits
        seen_second = model(**dict(other, attention_mask=unmasked)).logits
    # T5: the decoder reads every encoder position the mask lets through; BERT: the positions before the padding.
    kept = slice(None) if name.startswith("t5") else slice(0, 15)
    torch.testing.assert_close(first[1, kept], second[1, kept])
    assert not torch.allclose(seen_first[1, kept], seen_second[1, kept])


def test_cpu_dropout_changes_only_plain_dropout_and_sdpa_models():
    model = _model("bert-tiny")
    model.config._attn_implementation = "eager"  # a user's choice is left alone
    modules, attention = train_utils.use_cpu_dropout(model)
    assert modules == sum(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules()) > 0
    assert not attention and model.config._attn_implementation == "eager"


def test_cpu_dropout_leaves_the_saved_model_as_it_was(tmp_path):
    model = _model("bert-tiny")
    assert train_utils.use_cpu_dropout(model) == (sum(type(m) is torch.nn.Dropout for m in model.modules()), True)
    model.save_pretrained(tmp_path)
    assert "cpu_dropout" not in (tmp_path / "config.json").read_text()
    assert AutoModelForMaskedLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
