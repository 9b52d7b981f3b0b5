"""run_mlm.py end to end, in-process, on tiny fixtures and a tiny BERT built from a config."""

import json
import logging
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import packing
import run_mlm
import span_corruption
from arguments import UserError
from conftest import ROOT, TINY_BERT, shared_path


def run(tmp_path, *extra, corpus=None, name="out"):
    args = [*TINY_BERT, f"--output_dir={tmp_path / name}", "--max_steps=4", "--save_steps=2"]
    if corpus is not None:
        args += [f"--train_file={corpus / 'train.txt'}", f"--validation_file={corpus / 'validation.txt'}"]
    return run_mlm.main(args + list(extra))


def test_txt_packed_trains_and_writes_results(tmp_path, text_corpus):
    metrics = run(tmp_path, corpus=text_corpus)
    out = tmp_path / "out"
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["perplexity"] == pytest.approx(metrics["perplexity"])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(logs) == 4 and all(h["tokens_per_second"] > 0 and 0 < h["mfu"] < 1 for h in logs[1:])


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "parquet"])
def test_other_file_formats(tmp_path, text_corpus, fmt):
    paths = []
    for split in ("train", "validation"):
        lines = (text_corpus / f"{split}.txt").read_text().splitlines()
        frame = pd.DataFrame({"id": range(len(lines)), "content": lines})
        path = tmp_path / f"{split}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        elif fmt == "parquet":
            frame.to_parquet(path)
        else:
            frame.to_json(path, orient="records", lines=True)
        paths.append(path)
    metrics = run(tmp_path, f"--train_file={paths[0]}", f"--validation_file={paths[1]}", "--text_column_name=content")
    assert math.isfinite(metrics["eval_loss"])


def test_streaming_needs_max_steps_and_runs(tmp_path, text_corpus):
    with pytest.raises(UserError, match="--max_steps"):
        run_mlm.main([*TINY_BERT, f"--output_dir={tmp_path / 'x'}", "--streaming", f"--train_file={text_corpus / 'train.txt'}"])
    metrics = run(tmp_path, "--streaming", corpus=text_corpus, name="stream")
    assert math.isfinite(metrics["eval_loss"])


def test_pack_token_ids_cuts_the_joined_texts_into_full_blocks():
    """Packing joins the texts' tokens in order and cuts exactly block_size per row, dropping the tail; offsets
    (for whole-word masking) are packed pair by pair alongside; a dataset batch formatted as "arrow" packs the same."""
    import pyarrow as pa


    ids = [[101, 5, 6, 102], [101, 7, 102], [], [101, 8, 9, 10, 11, 102]]  # 13 tokens: 3 rows of 4, 1 left over
    offsets = [[(0, 0), (0, 1), (2, 3), (0, 0)], [(0, 0), (0, 2), (0, 0)], [],
               [(0, 0), (0, 1), (1, 2), (3, 5), (5, 6), (0, 0)]]
    joined = [t for row in ids for t in row]
    joined_offsets = [list(pair) for row in offsets for pair in row]
    packed = packing.pack_token_ids({"input_ids": ids, "offset_mapping": offsets}, 4)
    assert packed.column("input_ids").to_pylist() == [joined[0:4], joined[4:8], joined[8:12]]
    assert packed.column("offset_mapping").to_pylist() == [joined_offsets[0:4], joined_offsets[4:8], joined_offsets[8:12]]
    assert packed.schema.field("input_ids").type == pa.list_(pa.int32(), 4)
    assert packing.pack_token_ids(pa.table({"input_ids": ids}), 4).column("input_ids").equals(packed.column("input_ids"))
    assert packing.pack_token_ids({"input_ids": ids}, 14).num_rows == 0


def test_packed_offsets_let_whole_word_masking_mask_whole_words():
    """Packed offset_mapping rows stay aligned with their tokens (a piece continues the word before it exactly
    when WordPiece marks it "##"), and the collator masks every piece of a word or none."""
    import numpy as np

    from conftest import SENTENCES

    tokenizer = run_mlm.train_wordpiece_tokenizer([SENTENCES], 120, 64)  # small vocabulary: words split into pieces
    encoded = tokenizer(SENTENCES * 4, return_offsets_mapping=True, return_attention_mask=False, return_token_type_ids=False)
    packed = packing.pack_token_ids(encoded, 16).to_pylist()
    collator = run_mlm.FastMLMCollator(tokenizer, mlm_probability=0.4, whole_word_mask=True, mask_replace_prob=1.0,
                                          random_replace_prob=0.0, seed=0)
    batch = collator(packed)
    labels, special = batch["labels"].numpy(), np.isin(np.array([row["input_ids"] for row in packed]), tokenizer.all_special_ids)
    words_seen = split_words = 0
    for row, offsets in enumerate(row["offset_mapping"] for row in packed):
        word = []  # positions of the current word's pieces: a piece that starts where the previous one ended
        for position, (start, end) in enumerate(offsets + [(-1, -1)]):
            continues = word and position < len(offsets) and not special[row, position] and start == offsets[word[-1]][1]
            if 0 < position < len(offsets):  # ids and offsets still belong together: WordPiece marks continuations
                # "##" (a row's first piece may continue a word cut by the row before)
                assert bool(continues) == tokenizer.convert_ids_to_tokens(packed[row]["input_ids"][position]).startswith("##")
            if not continues:
                if word:
                    words_seen += 1
                    split_words += len(word) > 1
                    assert len({labels[row, p] != -100 for p in word}) == 1, (row, word)
                word = [] if position == len(offsets) or special[row, position] else [position]
            else:
                word.append(position)
    assert split_words > 5 and (labels != -100).any()


@pytest.mark.parametrize("mode", [["--whole_word_mask"], ["--streaming", "--line_by_line"]])
def test_whole_word_mask_and_streaming_line_by_line_run(tmp_path, text_corpus, mode):
    metrics = run(tmp_path, *mode, corpus=text_corpus, name="run")
    assert math.isfinite(metrics["eval_loss"])


def test_worker_processes_and_a_local_dataset_folder(tmp_path, text_corpus):
    """--preprocessing_num_workers maps in a pool of worker processes (each packs its own shard); --dataset_name
    takes what load_dataset takes, here a local folder with train.txt and validation.txt instead of a Hub name."""
    one = run(tmp_path, "--overwrite_cache", corpus=text_corpus, name="one")
    two = run(tmp_path, "--preprocessing_num_workers=2", "--overwrite_cache", corpus=text_corpus, name="two")
    # The tokenizer of the first run: training one again on the same text need not give the same vocabulary
    # (tokenizers' WordPiece trainer breaks ties in hash-map order; huggingface/tokenizers#1794).
    folder = run(tmp_path, f"--dataset_name={text_corpus}", f"--tokenizer_name={tmp_path / 'one'}", name="folder")
    assert math.isfinite(two["eval_loss"]) and math.isfinite(folder["eval_loss"])
    # the same text and tokenizer, so the same blocks from the folder; two shards may each drop a tail, so one
    # block fewer at most
    assert folder["eval_loss"] == pytest.approx(one["eval_loss"])
    assert one["train_samples"] - 1 <= two["train_samples"] <= one["train_samples"]


def test_line_by_line_differs_from_packed(tmp_path, text_corpus):
    packed = run(tmp_path, "--max_eval_samples=1000", corpus=text_corpus, name="packed")
    lines = run(tmp_path, "--line_by_line", "--pad_to_max_length", corpus=text_corpus, name="lines")
    # packed blocks are full rows of 32 tokens; line-by-line keeps one (short) line per example
    assert packed["train_samples"] < lines["train_samples"]
    assert packed["eval_loss"] != lines["eval_loss"]


def test_config_overrides_shape_the_model(tmp_path, text_corpus):
    run(tmp_path, corpus=text_corpus)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (32, 1, 64)
    assert config["vocab_size"] <= 400


def test_unknown_config_override_key(tmp_path):
    with pytest.raises(UserError, match="config_overrides"):
        run_mlm.main(["--model_type=bert", "--config_overrides=hidden_sise=32", f"--output_dir={tmp_path}"])


def test_tokenizer_trained_once_then_reused_and_data_cached(tmp_path, text_corpus, caplog):
    caplog.set_level(logging.INFO)
    run(tmp_path, "--overwrite_cache", corpus=text_corpus, name="a")
    assert "Saved tokenized data to cache" in caplog.text
    first_vocab = (tmp_path / "a" / "tokenizer.json").read_text()
    caplog.clear()
    run(tmp_path, corpus=text_corpus, name="b")  # a new output_dir: a sweep's next trial
    assert (tmp_path / "b" / "tokenizer.json").read_text() == first_vocab
    assert "Loaded tokenized data from cache" in caplog.text
    assert "Saved tokenized data to cache" not in caplog.text


def test_a_run_of_any_length_logs_its_loss_about_50_times(tmp_path, text_corpus):
    args = [a for a in TINY_BERT if not a.startswith("--logging_steps")]
    run_mlm.main([*args, f"--output_dir={tmp_path / 'o'}", "--max_steps=100", "--save_strategy=no", "--do_train",
                  f"--train_file={text_corpus / 'train.txt'}"])
    history = json.loads((tmp_path / "o" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(2, 101, 2))


def test_each_streamed_corpus_gets_its_own_tokenizer(tmp_path, text_corpus):
    """The trained-tokenizer cache is keyed by the data (path, size, time), streamed or not."""
    other = tmp_path / "other"
    other.mkdir()
    lines = [f"zebra quokka narwhal axolotl {i} pangolin okapi" for i in range(200)]
    (other / "train.txt").write_text("\n".join(lines[:180]) + "\n")
    (other / "validation.txt").write_text("\n".join(lines[180:]) + "\n")
    run(tmp_path, "--streaming", corpus=text_corpus, name="a")
    run(tmp_path, "--streaming", corpus=other, name="b")
    vocabulary = {name: json.loads((tmp_path / name / "tokenizer.json").read_text())["model"]["vocab"] for name in "ab"}
    assert "quokka" in vocabulary["b"] and "quokka" not in vocabulary["a"]


def test_auto_resume_and_overwrite(tmp_path, text_corpus, caplog):
    caplog.set_level(logging.INFO)
    run(tmp_path, corpus=text_corpus)
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    caplog.clear()
    metrics = run(tmp_path, "--max_steps=6", corpus=text_corpus)
    assert "Resuming from" in caplog.text and "checkpoint-4" in caplog.text
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    caplog.clear()
    run(tmp_path, "--max_steps=2", "--overwrite_output_dir", corpus=text_corpus)
    assert "Resuming from" not in caplog.text
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2
    assert (tmp_path / "out" / "checkpoint-6").is_dir()  # starting fresh deletes nothing
    assert metrics["eval_loss"] > 0


def test_equals_form_and_config_file(tmp_path, text_corpus):
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model_type": "bert",
        "config_overrides": "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,max_position_embeddings=128",
        "tokenizer_vocab_size": 400, "max_seq_length": 32, "train_file": str(text_corpus / "train.txt"),
        "validation_file": str(text_corpus / "validation.txt"), "max_steps": 2, "learning_rate": 0.1,
        "output_dir": str(tmp_path / "cfg"), "report_to": "none", "per_device_train_batch_size": 4,
    }))
    run_mlm.main([str(cfg), "--learning_rate", "3e-4", "--weight_decay=0.05"])
    args = json.loads((tmp_path / "cfg" / "run_info.json").read_text())
    assert args["script"] == "run_mlm"
    config = args["config"]
    assert config["learning_rate"] == 3e-4  # the CLI wins over the file
    assert config["weight_decay"] == 0.05 and config["max_steps"] == 2 and config["tokenizer_vocab_size"] == 400


def test_legacy_flags_are_mapped(tmp_path, text_corpus, capsys):
    run(tmp_path, "--evaluation_strategy=steps", "--eval_steps=2", "--warmup_ratio=0.25", "--no_cuda",
        "--overwrite_output_dir", corpus=text_corpus)
    err = capsys.readouterr().err
    for old, new in [("evaluation_strategy", "eval_strategy"), ("warmup_ratio", "warmup_steps"), ("no_cuda", "use_cpu")]:
        assert f"--{old} was removed in transformers 5; using --{new}" in err
    config = json.loads((tmp_path / "out" / "run_info.json").read_text())["config"]
    assert config["eval_strategy"] == "steps" and config["warmup_steps"] == 0.25 and config["use_cpu"]


def test_course_notes_sweep_command_runs_unchanged(tmp_path, monkeypatch):
    """The sweep from the course notes: ${args} as wandb renders them, then the fixed flags."""
    monkeypatch.chdir(tmp_path)
    argv = ["--learning_rate=5.5e-05", "--weight_decay=0.01", "--num_train_epochs", "3",
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16",
            "--output_dir", "./bert-sweep-checkpoints", "--overwrite_output_dir"]
    from arguments import DataArguments, ModelArguments, parse_args
    from transformers import TrainingArguments
    model_args, data_args, mlm_args, training_args = parse_args(
        (ModelArguments, DataArguments, run_mlm.MLMArguments, TrainingArguments), argv)
    assert (training_args.learning_rate, training_args.weight_decay, training_args.num_train_epochs) == (5.5e-05, 0.01, 3)
    assert data_args.overwrite_output_dir and training_args.output_dir == "./bert-sweep-checkpoints"
    # and it really trains (shortened with --max_steps so the test stays fast)
    metrics = run_mlm.main(argv + ["--max_steps=2", "--max_seq_length=32", "--report_to=none",
                                   "--config_overrides=hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"])
    assert math.isfinite(metrics["eval_loss"])
    assert (tmp_path / "bert-sweep-checkpoints" / "all_results.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--learning_rate", "abc"], "learning_rate"),
    (["--lerning_rate=1e-4"], "did you mean --learning_rate"),
    (["--train_file=data.xlsx"], "unknown extension"),
    (["--train_file=/nonexistent/file.txt", "--output_dir=OUT"], "does not exist"),
    (["--mlm_probability=1.5"], "mlm_probability"),
    (["--model_name_or_path=bert-base-uncased", "--config_overrides=hidden_size=32"], "config_overrides"),
    (["--max_seq_length=4096", "--output_dir=OUT"], "exceeds the model's limit"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "o")) for a in args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run_mlm.py"), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], proc.stderr[-2000:]


@pytest.mark.slow
def test_wikitext_bert_mini_reaches_hf_perplexity(tmp_path):
    """The foundation issue's reference run: HF's run_mlm.py reaches 1459 with these settings. This script,
    measured with torch's dropout: seed 42 1493.3, seed 43 1451.6. Seeds move it by ~3%, so the bar is HF's
    figure + 5% (an untrained model is above 5000)."""
    data = shared_path("data", "wikitext-2-raw")
    tokenizer = shared_path("models", "minilm-l6-h384-uncased")
    metrics = run_mlm.main([
        f"--config_name={ROOT}/configs/bert-mini.json", f"--tokenizer_name={tokenizer}",
        f"--train_file={data}/wiki.test.raw", f"--validation_file={data}/wiki.valid.raw",
        "--max_seq_length=128", "--per_device_train_batch_size=32", "--per_device_eval_batch_size=64",
        "--max_steps=200", "--learning_rate=5e-4", "--warmup_steps=20", "--seed=42",
        "--logging_steps=50", "--save_strategy=no", "--report_to=none", "--disable_tqdm=True",
        f"--output_dir={tmp_path / 'wiki'}",
    ])
    print(f"wikitext perplexity {metrics['perplexity']:.1f}, {200 * 32 * 128 / metrics['train_runtime']:.0f} tokens/s")
    assert metrics["perplexity"] <= 1459 * 1.05


def test_token_ids_equal_the_tokenizer_call(tmp_path):
    """packing.TokenIds (Rust encode_batch_fast, no offsets) gives exactly what tokenizer(texts) gives, for
    a WordPiece and a T5 Unigram tokenizer, also when the Rust tokenizer comes set to truncate and pad (as
    BERT's and MiniLM's tokenizer.json do), and it does take the fast path then."""
    from conftest import SENTENCES

    texts = SENTENCES + ["Ünïcödé — ﬁne “quotes”", "a" * 300, "x"]
    wordpiece = run_mlm.train_wordpiece_tokenizer([SENTENCES], 200, 64)
    unigram = span_corruption.train_t5_unigram_tokenizer(SENTENCES * 3, 150, output_dir=tmp_path / "t5", num_sentinels=4)
    expected = {}
    for tokenizer in (wordpiece, unigram):
        expected[tokenizer] = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        assert max(map(len, expected[tokenizer])) > 8
        tokenizer.backend_tokenizer.enable_truncation(8)  # state a tokenizer.json can carry
        tokenizer.backend_tokenizer.enable_padding(length=16)
        assert packing.TokenIds(tokenizer)(texts)["input_ids"] == expected[tokenizer]

    class NoSlowCall:
        """The wrapped tokenizer, but calling it (the slow path) fails."""

        backend_tokenizer = wordpiece.backend_tokenizer

        def __call__(self, *args, **kwargs):
            raise AssertionError("token_ids took the slow path")

    wordpiece.backend_tokenizer.enable_truncation(8)
    assert packing.TokenIds(NoSlowCall())(texts)["input_ids"] == expected[wordpiece]


PIECE_TEXTS = [
    "The Cat SAT on the Mat.", "plain ascii, with punctuation: (yes) 3.14 @-@ it's", "Hello [MASK] world",
    "hello [mask] there", "[CLS][SEP] [Pad] [unk]", "[MASK], a[MASK]b", "tab\there", "vertical\x0btab", "form\x0cfeed",
    "del\x7fete", "nul\x00byte", "carriage\rreturn", "line\nbreak", "Café naïve ÅNGSTRÖM", "a \u0301b \u0301", "中文 text 日本",
    "ÀB", "x", "", " ", "   a   ", "a  b", "no\u00a0break\u2003em", "ﬁne “quotes”", "ΟΔΟΣ ΟΔΟΣ.", "w" * 150 + " w",
]


@pytest.mark.parametrize("lowercase", [True, False])
def test_token_ids_of_space_separated_pieces_are_the_tokenizer_ids(lowercase):
    """TokenIds tokenizes each space-separated piece once with a BERT tokenizer and joins the pieces' ids; every
    text gets the ids of tokenizer(texts), the first time and from remembered pieces: mixed case, special
    tokens in any case and inside pieces, control characters, other whitespace, accents (a combining mark
    right after a space), CJK, a word over WordPiece's 100 characters, empty texts and runs of spaces. A
    tokenizer with an added token that holds a space takes whole texts, and must."""
    from conftest import SENTENCES

    tokenizer = run_mlm.train_wordpiece_tokenizer([SENTENCES + PIECE_TEXTS], 300, 64, lowercase=lowercase)
    texts = SENTENCES + PIECE_TEXTS
    expected = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    encode = packing.TokenIds(tokenizer)
    assert encode.pieces == {}
    assert encode(texts)["input_ids"] == expected
    assert "Mat." in encode.pieces and "" in encode.pieces
    assert encode(texts[::-1])["input_ids"] == expected[::-1]  # now every piece is remembered

    tokenizer.add_tokens(["new york"])
    texts = ["I love new york", "new  york", "new york new"]
    expected = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    encode = packing.TokenIds(tokenizer)
    assert encode.pieces is None and encode(texts)["input_ids"] == expected
    encode.pieces, encode.around = {}, packing.TokenIds._special_ids_around(encode.backend)
    assert encode(texts)["input_ids"] != expected  # without that guard the pieces would be wrong: the check can fail


def test_token_ids_forget_pieces_beyond_their_bounds_and_stay_exact():
    """TokenIds' memory of pieces is bounded (pieces and characters); past a bound it starts afresh, same ids."""
    from conftest import SENTENCES

    tokenizer = run_mlm.train_wordpiece_tokenizer([SENTENCES], 200, 64)
    expected = tokenizer(SENTENCES, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    encode = packing.TokenIds(tokenizer)
    encode.MAX_CHARACTERS = 40
    got = [ids for text in SENTENCES for ids in encode([text])["input_ids"]]
    assert got == expected
    assert 0 < encode.characters <= 40 + max(map(len, SENTENCES)) and len(encode.pieces) < len({
        piece for text in SENTENCES for piece in text.split(" ")})


def test_token_ids_pieces_on_real_text_and_not_for_other_tokenizers(tmp_path):
    """On WikiText (../shared) with MiniLM's tokenizer, TokenIds' ids equal the tokenizer call's and far fewer
    pieces are tokenized than the text holds; a T5 Unigram tokenizer (not BERT's normalizer) takes whole texts."""
    from conftest import SENTENCES

    unigram = span_corruption.train_t5_unigram_tokenizer(SENTENCES * 3, 150, output_dir=tmp_path / "t5", num_sentinels=4)
    assert packing.TokenIds(unigram).pieces is None
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
    wiki, minilm = os.path.join(root, "data", "wikitext-2-raw", "wiki.valid.raw"), os.path.join(root, "models", "minilm-l6-h384-uncased")
    if not (os.path.exists(wiki) and os.path.isdir(minilm)):
        pytest.skip("../shared WikiText or MiniLM missing")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    texts = packing.non_blank(open(wiki, encoding="utf-8").read().splitlines())
    expected = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
    encode = packing.TokenIds(tokenizer)
    assert [ids for i in range(0, len(texts), 1000) for ids in encode(texts[i : i + 1000])["input_ids"]] == expected
    assert len(encode.pieces) < sum(len(text.split(" ")) for text in texts) / 5


def test_edited_preprocessing_is_run_again_and_overwrite_cache_reruns_it(tmp_path, caplog):
    """Editing the preprocessing (the ADAPT section) gives the new result, from a file-backed dataset whose own
    datasets cache already holds the old one; so do --overwrite_cache and deleting our cache folder."""
    import shutil

    import data_utils

    (tmp_path / "t.txt").write_text("a b\nc d\n")
    raw = data_utils.load_data_file(str(tmp_path / "t.txt"), "--train_file", cache_dir=str(tmp_path / "hf"))
    cache = str(tmp_path / "ours")

    def ones(batch):
        return {"x": [1] * len(batch["text"])}

    def fives(batch):  # "edited"
        return {"x": [5] * len(batch["text"])}

    old = data_utils.cached_map(raw, ones, ("k",), cache, batched=True)
    caplog.set_level(logging.INFO)
    same = data_utils.cached_map(raw, ones, ("k",), cache, batched=True)
    assert "Loaded tokenized data from cache" in caplog.text and list(same["x"]) == [1, 1]  # the same code
    edited = data_utils.cached_map(raw, fives, ("k",), cache, batched=True)
    assert list(edited["x"]) == [5, 5]
    assert list(old["x"]) == [1, 1]
    for rebuild in ("overwrite", "delete the cache folder"):
        caplog.clear()
        if rebuild == "delete the cache folder":
            shutil.rmtree(cache)
        again = data_utils.cached_map(raw, ones, ("k",), cache, overwrite=rebuild == "overwrite", batched=True)
        assert "Saved tokenized data to cache" in caplog.text and "Loaded" not in caplog.text
        assert list(again["x"]) == [1, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_memory_is_the_processes_own_not_its_parents():
    # A run started by a large process (a benchmark, a notebook) used to report the parent's RSS as its peak.
    ballast = b"x" * (1200 << 20)  # written, so resident in this (the parent) process
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import throughput; print(throughput.peak_memory_mb())"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    peak = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.split()[-1])
    del ballast  # held until the child has run
    assert 50 < peak < 1000  # the child's own imports (torch, transformers): a few hundred MB


def test_sparse_mlm_head_gives_the_dense_heads_loss_gradients_and_predictions():
    """The head computed only at labelled positions: the same loss and gradients as BERT's own head over every
    position (also normalised by a whole step's token count), the argmax at the labelled positions in
    evaluation, and no predictions in a training step, which the Trainer does not read."""
    import copy

    import torch
    from transformers import BertConfig, BertForMaskedLM


    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    dense = BertForMaskedLM(config)
    sparse = copy.deepcopy(dense)
    assert run_mlm.enable_sparse_mlm_head(sparse)
    input_ids = torch.randint(5, 120, (3, 16))
    labels = torch.where(torch.rand(3, 16) < 0.2, input_ids, torch.full_like(input_ids, -100))
    labels[0, 0] = 7  # at least one label
    for model in (dense, sparse):
        model.train()
    dense_loss = dense(input_ids=input_ids, labels=labels).loss
    output = sparse(input_ids=input_ids, labels=labels)
    assert output.logits is None
    torch.testing.assert_close(output.loss, dense_loss)
    dense_loss.backward()
    output.loss.backward()
    for (name, a), (_, b) in zip(dense.named_parameters(), sparse.named_parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, msg=name)
    count = int((labels != -100).sum())
    summed = sparse(input_ids=input_ids, labels=labels, num_items_in_batch=count * 2).loss
    torch.testing.assert_close(summed, dense_loss.detach() / 2)
    sparse.eval()
    dense.eval()
    with torch.no_grad():
        predictions = sparse(input_ids=input_ids, labels=labels).logits
        wanted = torch.where(labels != -100, dense(input_ids=input_ids).logits.argmax(-1), -100)
    assert torch.equal(predictions, wanted)


def test_a_stream_without_validation_data_holds_out_its_first_blocks(tmp_path, text_corpus):
    """--max_eval_samples counts blocks held out of the stream after packing, so a few short texts never leave
    evaluation empty (it used to hold out that many texts: 2 lines packed to no block, and evaluation crashed)."""
    metrics = run_mlm.main([*TINY_BERT, f"--output_dir={tmp_path / 'out'}", f"--train_file={text_corpus / 'train.txt'}",
                            "--streaming", "--max_steps=3", "--max_eval_samples=2", "--do_train", "--do_eval"])
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_accuracy"] >= 0


def test_label_smoothing_trains_both_heads_alike_and_perplexity_stays_unsmoothed(tmp_path, text_corpus):
    """--label_smoothing_factor used to crash evaluation with the sparse head (full logits reached the metric). The
    sparse head now smooths at the masked positions as the Trainer does on all of them (the same training loss),
    and evaluation reports the plain cross-entropy: the eval loss of the saved model evaluated without smoothing."""
    smooth = ["--label_smoothing_factor=0.1", "--do_train", "--do_eval", "--seed=3"]
    sparse = run(tmp_path, *smooth, corpus=text_corpus, name="sparse")
    dense = run(tmp_path, *smooth, "--sparse_mlm_head=false", corpus=text_corpus, name="dense")
    assert sparse["train_loss"] == pytest.approx(dense["train_loss"], abs=1e-5)
    assert sparse["eval_loss"] == pytest.approx(dense["eval_loss"], abs=1e-5)
    assert sparse["perplexity"] == pytest.approx(math.exp(sparse["eval_loss"]))
    tiny = [a for a in TINY_BERT if not a.startswith(("--model_type", "--config_overrides", "--tokenizer_vocab_size"))]
    alone = run_mlm.main([*tiny, f"--model_name_or_path={tmp_path / 'sparse'}", "--do_eval", "--seed=3",
                          f"--validation_file={text_corpus / 'validation.txt'}", f"--output_dir={tmp_path / 'alone'}"])
    assert alone["eval_loss"] == pytest.approx(sparse["eval_loss"], abs=1e-6)


def test_sparse_head_loss_is_label_smoothed_cross_entropy_in_training_only():
    """At the masked positions: torch's cross-entropy with label_smoothing while training, plain in evaluation."""
    import copy

    import torch.nn.functional as F
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(config)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.mul_(20)  # peaked predictions: smoothing changes the loss a lot
    dense = copy.deepcopy(model)
    assert run_mlm.enable_sparse_mlm_head(model, label_smoothing=0.2)
    ids = torch.randint(5, 50, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    logits = dense(input_ids=ids).logits.view(-1, 50)
    smoothed = F.cross_entropy(logits, labels.view(-1), label_smoothing=0.2)
    plain = F.cross_entropy(logits, labels.view(-1))
    assert abs(smoothed - plain) > 0.01
    model.train()
    assert model(input_ids=ids, labels=labels).loss.item() == pytest.approx(smoothed.item(), rel=1e-5)
    model.eval()
    assert model(input_ids=ids, labels=labels).loss.item() == pytest.approx(plain.item(), rel=1e-5)
