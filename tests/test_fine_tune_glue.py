"""fine_tune_glue.py end to end, in-process: GLUE-layout and other fixtures written here, a tiny BERT and a
tiny T5 built from configs with tokenizers trained here. Tests marked slow use ../shared (MiniLM, GLUE files)."""

import json
import shutil
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel, T5Config, T5ForConditionalGeneration

import fine_tune_glue
import run_mlm
import span_corruption
from glue_data import COLA_TSV_COLUMNS, read_glue_tsv
from arguments import UserError
from conftest import ROOT, shared_path

WORDS = ("the film movie plot actor story cast scene was is felt very not quite truly good bad great dull "
         "funny awful charming boring fresh tired long short").split()
LABEL_WORDS = ("acceptable unacceptable positive negative equivalent not_equivalent entailment not_entailment "
               "neutral contradiction duplicate not_duplicate 0.0 0.2 1.4 2.6 3.8 4.0 5.0").split()
BASE = ["--report_to=none", "--disable_tqdm=True", "--max_seq_length=32", "--per_device_train_batch_size=4",
        "--per_device_eval_batch_size=8", "--max_steps=2", "--save_strategy=no", "--logging_steps=1",
        "--learning_rate=1e-3"]


def sentence(i, quote=False):
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(4 + i % 5)]
    if quote:  # bare double quotes, as in GLUE's files: a CSV reader with quoting would swallow the tabs
        words[1] = f'" {words[1]}'
    return " ".join(words) + f" {i}"


def write_tsv(path, header, rows, bom=False):
    lines = ([header] if header else []) + rows
    path.write_text(("\ufeff" if bom else "") + "\n".join("\t".join(map(str, r)) for r in lines) + "\n",
                    encoding="utf-8")


def write_glue_task(folder, task, n_train=24, n_dev=8, n_test=6):
    """A task folder shaped like the original GLUE download (same headers, quirks and label spellings)."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = [("train", n_train, 0), ("dev", n_dev, 100)]
    if task == "SST-2":
        for name, n, o in parts:
            write_tsv(folder / f"{name}.tsv", ["sentence", "label"], [[sentence(o + i, True) + " ", i % 2] for i in range(n)])
        write_tsv(folder / "test.tsv", ["index", "sentence"], [[i, sentence(200 + i, True)] for i in range(n_test)])
    elif task == "CoLA":  # no header; source, label, original label, sentence
        for name, n, o in parts:
            write_tsv(folder / f"{name}.tsv", None, [["gj04", i % 2, "" if i % 2 else "*", sentence(o + i)] for i in range(n)])
        write_tsv(folder / "test.tsv", ["index", "sentence"], [[i, sentence(200 + i)] for i in range(n_test)])
    elif task == "MRPC":  # starts with a byte-order mark
        header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
        for name, n, o in parts:
            write_tsv(folder / f"{name}.tsv", header, [[i % 2, 1000 + i, 2000 + i, sentence(o + i, True), sentence(o + i + 1)]
                                                       for i in range(n)], bom=True)
        write_tsv(folder / "test.tsv", ["index"] + header[1:], [[i, 1, 2, sentence(i), sentence(i + 3)] for i in range(n_test)],
                  bom=True)
    elif task == "STS-B":
        header = "index genre filename year old_index source1 source2 sentence1 sentence2".split()
        for name, n, o in parts:
            write_tsv(folder / f"{name}.tsv", header + ["score"], [[i, "main-captions", "MSRvid", "2012test", f"{i:04d}", "none",
                      "none", sentence(o + i), sentence(o + i + 2), f"{(i * 0.7) % 5:.3f}"] for i in range(n)])
        write_tsv(folder / "test.tsv", header, [[i, "g", "f", "y", "o", "s", "s", sentence(i), sentence(i + 1)] for i in range(n_test)])
    elif task == "MNLI":
        header = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                  "sentence2_parse sentence1 sentence2").split()
        labels = ["entailment", "neutral", "contradiction"]
        row = lambda i: [i, i, f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", sentence(i), sentence(i + 5)]  # noqa: E731
        write_tsv(folder / "train.tsv", header + ["label1", "gold_label"], [row(i) + [labels[i % 3]] * 2 for i in range(n_train)])
        for name in ("dev_matched", "dev_mismatched"):
            write_tsv(folder / f"{name}.tsv", header + [f"label{k}" for k in range(1, 6)] + ["gold_label"],
                      [row(100 + i) + [labels[i % 3]] * 6 for i in range(n_dev)])
        for name in ("test_matched", "test_mismatched"):
            write_tsv(folder / f"{name}.tsv", header, [row(200 + i) for i in range(n_test)])
    elif task == "RTE":
        for name, n, o in parts:
            write_tsv(folder / f"{name}.tsv", ["index", "sentence1", "sentence2", "label"],
                      [[i, sentence(o + i), sentence(o + i + 1), ["entailment", "not_entailment"][i % 2]] for i in range(n)])
    return folder


@pytest.fixture(scope="session")
def glue_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_data")
    for task in ("SST-2", "CoLA", "MRPC", "STS-B", "MNLI", "RTE"):
        write_glue_task(root / task, task)
    return root


def corpus():
    return [sentence(i, quote=True) for i in range(300)] + [" ".join(LABEL_WORDS)] * 5


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 1-layer BERT encoder without a head (like MiniLM's checkpoint) and a WordPiece tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = run_mlm.train_wordpiece_tokenizer(corpus(), 300, 64)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_t5")
    tokenizer = span_corruption.train_t5_unigram_tokenizer(corpus(), 300, output_dir=folder, num_sentinels=4)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1,
                      num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=tokenizer.pad_token_id,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def run(model, out, *extra):
    return fine_tune_glue.main([f"--model_name_or_path={model}", f"--output_dir={out}", *BASE, *extra])


def read_predictions(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "index\tprediction"
    rows = [line.split("\t") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == list(range(len(rows))) and all(len(r) == 2 for r in rows)
    return [r[1] for r in rows]


# --- T5 formatting --------------------------------------------------------------------------------------

@pytest.mark.parametrize("task,texts,expected", [
    ("cola", {"sentence": "John made Bill master of himself."}, "cola sentence: John made Bill master of himself."),
    ("sst2", {"sentence": "it confirms fincher 's status . "}, "sst2 sentence: it confirms fincher 's status ."),
    ("mnli", {"premise": "P text", "hypothesis": "H text"}, "mnli hypothesis: H text premise: P text"),
    ("mrpc", {"sentence1": "A", "sentence2": "B"}, "mrpc sentence1: A sentence2: B"),
    ("qqp", {"question1": "Q1?", "question2": "Q2?"}, "qqp question1: Q1? question2: Q2?"),
    ("stsb", {"sentence1": "A", "sentence2": "B"}, "stsb sentence1: A sentence2: B"),
    ("qnli", {"question": "Where?", "sentence": "There."}, "qnli question: Where? sentence: There."),
    ("rte", {"sentence1": "A", "sentence2": "B"}, "rte sentence1: A sentence2: B"),
    ("wnli", {"sentence1": "A", "sentence2": "B"}, "wnli sentence1: A sentence2: B"),
    (None, {"review": "R", "answer": "A"}, "review: R answer: A"),  # other data: no prefix, given order
])
def test_format_t5_input_follows_the_paper(task, texts, expected):
    assert fine_tune_glue.format_t5_input(task, texts) == expected


def test_format_t5_target():
    names = list(fine_tune_glue.GLUE_TASKS["rte"].labels)
    lookup = {"0": 0, "1": 1, "entailment": 0, "not_entailment": 1}
    assert fine_tune_glue.format_t5_target(1, names, lookup) == "not_entailment"
    assert fine_tune_glue.format_t5_target("entailment", names, lookup) == "entailment"
    assert [fine_tune_glue.format_t5_target(v, None, None) for v in ("3.750", 3.8, 0.09, 5, "4.5")] == \
        ["3.8", "3.8", "0.0", "5.0", "4.4"]  # 4.5 * 5 = 22.5 rounds to even, as tf.round does


def test_label_words_are_the_hub_names():
    tasks = fine_tune_glue.GLUE_TASKS
    assert tasks["cola"].labels == ("unacceptable", "acceptable") and tasks["sst2"].labels == ("negative", "positive")
    assert tasks["mnli"].labels == ("entailment", "neutral", "contradiction") and tasks["stsb"].labels is None
    assert tasks["wnli"].labels == ("not_entailment", "entailment") and tasks["qnli"].labels == tasks["rte"].labels


# --- GLUE files -----------------------------------------------------------------------------------------

def test_read_glue_tsv_quirks(glue_data):
    cola = read_glue_tsv(str(glue_data / "CoLA" / "train.tsv"), "--train_file", COLA_TSV_COLUMNS)
    assert cola.column_names == list(COLA_TSV_COLUMNS) and len(cola) == 24  # first row is data
    cola_test = read_glue_tsv(str(glue_data / "CoLA" / "test.tsv"), "--test_file", COLA_TSV_COLUMNS)
    assert cola_test.column_names == ["index", "sentence"]
    mrpc = read_glue_tsv(str(glue_data / "MRPC" / "train.tsv"), "--train_file")
    assert mrpc.column_names[0] == "Quality"  # no BOM glued to the first name
    assert mrpc[0]["#1 String"].count('"') == 1  # a bare quote stays text


def test_sst2_glue_layout_train_eval_predict(tmp_path, tiny_bert, glue_data):
    out = tmp_path / "sst2"
    metrics = run(tiny_bert, out, "--task_name=SST-2", f"--data_dir={glue_data / 'SST-2'}", "--do_train", "--do_eval",
                  "--do_predict", "--max_predict_samples=4")
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["train_samples"] == 24 and metrics["eval_samples"] == 8
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["eval_accuracy"] == metrics["eval_accuracy"]
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert set(read_predictions(out / "predict_results_sst2.txt")) <= {"negative", "positive"}
    assert len(read_predictions(out / "predict_results_sst2.txt")) == 4  # GLUE's test file has no labels
    info = json.loads((out / "run_info.json").read_text())
    assert info["config"]["task_name"] == "sst2" and info["config"]["train_sampling_strategy"] == "group_by_length"


@pytest.mark.parametrize("task,folder,keys", [
    ("cola", "CoLA", ["eval_matthews_correlation"]),
    ("mrpc", "MRPC", ["eval_accuracy", "eval_f1", "eval_combined_score"]),
    ("stsb", "STS-B", ["eval_pearson", "eval_spearmanr", "eval_combined_score"]),
    ("rte", "RTE", ["eval_accuracy"]),
])
def test_glue_tasks_report_their_metrics(tmp_path, tiny_bert, glue_data, task, folder, keys):
    metrics = run(tiny_bert, tmp_path / task, f"--task_name={task}", f"--data_dir={glue_data / folder}")
    assert all(key in metrics for key in keys), sorted(metrics)
    if len(keys) > 1:
        values = [metrics[k] for k in keys[:-1]]
        assert metrics["eval_combined_score"] == pytest.approx(sum(values) / len(values), nan_ok=True)


def test_stsb_is_regression_with_three_decimals(tmp_path, tiny_bert, glue_data, capsys):
    out = tmp_path / "stsb"
    run(tiny_bert, out, "--task_name=stsb", f"--data_dir={glue_data / 'STS-B'}", "--do_train", "--do_eval", "--do_predict")
    assert "(stsb, regression head)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    predictions = read_predictions(out / "predict_results_stsb.txt")
    assert len(predictions) == 6 and all(len(p.split(".")[1]) == 3 for p in predictions)


def test_mnli_matched_and_mismatched(tmp_path, tiny_bert, glue_data, monkeypatch):
    out = tmp_path / "mnli"
    monkeypatch.setenv("SWEEP_METRICS_FILE", str(tmp_path / "logged.jsonl"))  # every log record, with W&B's names
    metrics = run(tiny_bert, out, "--task_name=mnli", f"--data_dir={glue_data / 'MNLI'}", "--do_train", "--do_eval",
                  "--do_predict")
    assert "eval_accuracy" in metrics and "eval_accuracy_mm" in metrics and metrics["eval_samples_mm"] == 8
    for name in ("predict_results_mnli.txt", "predict_results_mnli-mm.txt"):
        assert set(read_predictions(out / name)) <= {"entailment", "neutral", "contradiction"}
    logged = [json.loads(line) for line in (tmp_path / "logged.jsonl").read_text().splitlines()]
    assert any("eval/accuracy_mm" in record for record in logged) and any("eval/accuracy" in r for r in logged)


def test_pad_to_max_length_changes_the_padding_only(tmp_path, tiny_bert, glue_data):
    """Same batches in the same order as the default, so comparing the two isolates the padding."""
    out = tmp_path / "padded"
    run(tiny_bert, out, "--task_name=sst2", f"--data_dir={glue_data / 'SST-2'}", "--pad_to_max_length")
    assert json.loads((out / "run_info.json").read_text())["config"]["train_sampling_strategy"] == "group_by_length"
    out = tmp_path / "shuffled"
    run(tiny_bert, out, "--task_name=sst2", f"--data_dir={glue_data / 'SST-2'}", "--pad_to_max_length",
        "--train_sampling_strategy=random")
    assert json.loads((out / "run_info.json").read_text())["config"]["train_sampling_strategy"] == "random"


def test_sampling_strategy_from_a_config_file_is_the_users_choice(tmp_path, tiny_bert, glue_data):
    """A flag set in a config file counts as given, as on the command line: the group_by_length default stays out."""
    config = tmp_path / "run.yaml"
    config.write_text(f"task_name: sst2\ndata_dir: {glue_data / 'SST-2'}\ntrain_sampling_strategy: random\n")
    out = tmp_path / "from_file"
    fine_tune_glue.main([str(config), f"--model_name_or_path={tiny_bert}", f"--output_dir={out}", *BASE])
    assert json.loads((out / "run_info.json").read_text())["config"]["train_sampling_strategy"] == "random"


# --- other data -----------------------------------------------------------------------------------------

def write_frame(frame, path):
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    else:
        frame.to_json(path, orient="records", lines=path.suffix == ".jsonl")
    return path


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "parquet", "tsv"])
def test_string_labels_in_any_format(tmp_path, tiny_bert, fmt):
    labels = ["yes", "no", "maybe"]
    frames = [pd.DataFrame({"sentence1": [sentence(i) for i in range(n)], "sentence2": [sentence(i + 9) for i in range(n)],
                            "label": [labels[i % 3] for i in range(n)]}) for n in (18, 9)]
    train, dev = (write_frame(f, tmp_path / f"{name}.{fmt}") for f, name in zip(frames, ("train", "dev")))
    out = tmp_path / "out"
    metrics = run(tiny_bert, out, f"--train_file={train}", f"--validation_file={dev}", f"--test_file={dev}", "--do_train",
                  "--do_eval", "--do_predict")
    assert "eval_accuracy" in metrics and "predict_accuracy" in metrics  # a test file with labels is scored too
    config = json.loads((out / "config.json").read_text())
    assert config["label2id"] == {"maybe": 0, "no": 1, "yes": 2}  # sorted
    assert set(read_predictions(out / "predict_results_data.txt")) <= set(labels)


def test_chosen_columns_and_float_labels_mean_regression(tmp_path, tiny_bert):
    frame = pd.DataFrame({"id": range(20), "a": [sentence(i) for i in range(20)], "b": [sentence(i + 1) for i in range(20)],
                          "score": [i / 4 for i in range(20)]})
    path = write_frame(frame, tmp_path / "data.csv")
    metrics = run(tiny_bert, tmp_path / "o", f"--train_file={path}", f"--validation_file={path}", "--text_column_names=a,b",
                  "--label_column_name=score")
    assert "eval_pearson" in metrics and "eval_spearmanr" in metrics and "eval_accuracy" not in metrics


def test_int_labels_single_sentence_and_held_out_validation(tmp_path, tiny_bert):
    frame = pd.DataFrame({"text": [sentence(i) for i in range(40)], "label": [3 + i % 2 for i in range(40)]})
    path = write_frame(frame, tmp_path / "train.jsonl")
    out = tmp_path / "o"
    metrics = run(tiny_bert, out, f"--train_file={path}", "--validation_split_percentage=20")
    assert metrics["eval_samples"] == 8 and metrics["train_samples"] == 32
    assert json.loads((out / "config.json").read_text())["label2id"] == {"3": 0, "4": 1}


def save_classifier(folder, tiny_bert, names):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=len(names))
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


def test_model_label_order_is_kept_when_names_match(tmp_path, tiny_bert, caplog):
    model = save_classifier(tmp_path / "yes_no", tiny_bert, ["YES", "no"])  # not the sorted order
    frame = pd.DataFrame({"sentence": [sentence(i) for i in range(12)], "label": ["no", "yes"] * 6})
    path = write_frame(frame, tmp_path / "d.csv")
    run(model, tmp_path / "kept", f"--train_file={path}", f"--validation_file={path}")
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["label2id"] == {"no": 1, "yes": 0}
    other = save_classifier(tmp_path / "pos_neg", tiny_bert, ["pos", "neg"])
    run(other, tmp_path / "new", f"--train_file={path}", f"--validation_file={path}")
    assert "Ignoring the model's labels" in caplog.text
    assert json.loads((tmp_path / "new" / "config.json").read_text())["label2id"] == {"no": 0, "yes": 1}


def test_eval_label_outside_the_model_labels(tmp_path, tiny_bert):
    model = save_classifier(tmp_path / "m", tiny_bert, ["no", "yes"])
    frame = pd.DataFrame({"sentence": ["a b", "c d", "e f"], "label": ["no", "yes", "perhaps"]})
    path = write_frame(frame, tmp_path / "dev.csv")
    with pytest.raises(UserError, match="'perhaps', not one of the model's labels"):
        run(model, tmp_path / "o", f"--validation_file={path}", "--do_eval")


# --- T5 text-to-text ------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", [[], ["--bf16", "--use_cpu"]], ids=["fp32", "bf16"])
def test_t5_is_chosen_from_the_config_and_predicts_text(tmp_path, tiny_t5, glue_data, precision):
    """fp32, and bf16 with torch's own bf16 kernels (generation too)."""
    out = tmp_path / "t5"
    metrics = run(tiny_t5, out, "--task_name=sst2", f"--data_dir={glue_data / 'SST-2'}", "--do_train", "--do_eval",
                  "--do_predict", "--max_steps=3", *precision)
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_samples"] == 8
    assert len(read_predictions(out / "predict_results_sst2.txt")) == 6
    generation = json.loads((out / "generation_config.json").read_text())
    longest = max(len(AutoTokenizer.from_pretrained(tiny_t5)(word).input_ids) for word in ("negative", "positive"))
    assert generation["max_new_tokens"] == longest  # the longest label and </s>, not a free-running decoder


def test_model_pretrained_by_run_span_t5_fine_tunes_text_to_text(tmp_path, glue_data):
    """The hand-off the two scripts promise: run_span_t5.py's saved model and Unigram tokenizer (with its 100
    sentinels) load here, are recognised as T5, and train and generate label words."""
    import run_span_t5

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus()), encoding="utf-8")
    pretrained = tmp_path / "pretrained"
    run_span_t5.main(["--model_type=t5", "--config_overrides=d_model=32,d_kv=16,num_heads=2,d_ff=64,num_layers=1",
                      "--tokenizer_vocab_size=300", "--max_seq_length=32", "--per_device_train_batch_size=4",
                      "--report_to=none", "--disable_tqdm=True", "--max_steps=2", "--save_strategy=no", "--do_train",
                      f"--train_file={text}", f"--output_dir={pretrained}"])
    out = tmp_path / "glue"
    metrics = run(pretrained, out, "--task_name=sst2", f"--data_dir={glue_data / 'SST-2'}", "--do_train", "--do_eval",
                  "--do_predict", "--max_steps=2")
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_samples"] == 8
    assert len(read_predictions(out / "predict_results_sst2.txt")) == 6
    # Text-to-text chosen from the config, no flag: a generating model, not a classification head.
    assert AutoConfig.from_pretrained(out).architectures == ["T5ForConditionalGeneration"]
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] > 0


def test_t5_regression_and_pairs(tmp_path, tiny_t5, glue_data):
    out = tmp_path / "t5-stsb"
    metrics = run(tiny_t5, out, "--task_name=stsb", f"--data_dir={glue_data / 'STS-B'}", "--do_train", "--do_eval",
                  "--do_predict")
    assert "eval_pearson" in metrics and "eval_spearmanr" in metrics
    assert all(p.count(".") == 1 for p in read_predictions(out / "predict_results_stsb.txt"))  # non-numbers: 0.000


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_t5"])
def test_dropout_flag_sets_the_models_dropout(tmp_path, glue_data, request, model):
    out = tmp_path / model
    run(request.getfixturevalue(model), out, "--task_name=rte", f"--data_dir={glue_data / 'RTE'}", "--dropout=0.3")
    config = json.loads((out / "config.json").read_text())
    keys = ("dropout_rate",) if model == "tiny_t5" else ("hidden_dropout_prob", "attention_probs_dropout_prob")
    assert all(config[key] == 0.3 for key in keys)


def test_t5_invalid_generated_label_counts_as_wrong(tmp_path, tiny_t5, monkeypatch):
    """Gold labels 1, 0, 1, 0; outputs 'equivalent', nonsense, nonsense, 'not_equivalent'. The invalid outputs
    count as wrong: accuracy 2/4; as the other class for F1 (T5's rule): TP 1, FP 1, FN 1, so F1 0.5."""
    keys = ["alpha", "bravo", "charlie", "delta"]
    frame = pd.DataFrame({"sentence1": [f"{k} film" for k in keys], "sentence2": ["plot"] * 4, "label": [1, 0, 1, 0]})
    dev = write_frame(frame, tmp_path / "dev.csv")
    outputs = dict(zip(keys, ["equivalent", "nonsense words", "nonsense words", "not_equivalent"]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)

    def fake_generate(self, input_ids=None, **kwargs):
        texts = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        targets = [next(v for k, v in outputs.items() if k in text) for text in texts]
        ids = tokenizer(targets, padding=True, return_tensors="pt").input_ids
        return torch.cat([torch.zeros_like(ids[:, :1]), ids], dim=1)  # starts with the decoder start token

    monkeypatch.setattr(T5ForConditionalGeneration, "generate", fake_generate)
    metrics = run(tiny_t5, tmp_path / "o", "--task_name=mrpc", f"--validation_file={dev}", "--do_eval")
    assert metrics["eval_accuracy"] == 0.5 and metrics["eval_f1"] == pytest.approx(0.5)


def test_text_to_text_flag_forces_a_head_on_t5_and_is_refused_for_encoders(tmp_path, tiny_t5, tiny_bert, glue_data):
    metrics = run(tiny_t5, tmp_path / "head", "--task_name=rte", f"--data_dir={glue_data / 'RTE'}", "--text_to_text=false")
    assert "eval_accuracy" in metrics
    assert json.loads((tmp_path / "head" / "config.json").read_text())["architectures"] == ["T5ForSequenceClassification"]
    with pytest.raises(UserError, match="encoder-decoder"):
        run(tiny_bert, tmp_path / "x", "--task_name=rte", f"--data_dir={glue_data / 'RTE'}", "--text_to_text=true")


# --- best model, resume, errors -------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--eval_strategy=steps", "--eval_steps=10", "--save_strategy=epoch"], "pass --save_strategy steps"),
    (["--eval_strategy=steps", "--eval_steps=10", "--save_strategy=steps", "--save_steps=25"], "pass --save_steps 20"),
    (["--eval_strategy=steps", "--eval_steps=0.1", "--save_strategy=steps", "--save_steps=100"], "mix a fraction"),
    (["--eval_strategy=steps", "--eval_steps=0.2", "--save_strategy=steps", "--save_steps=0.3"], "pass --save_steps 0.2"),
    (["--eval_strategy=no", "--save_strategy=steps"], "needs evaluations during training"),
])
def test_best_model_strategy_mismatch_is_caught_before_loading_data(tmp_path, flags, message):
    argv = ["--model_name_or_path=/nonexistent", "--train_file=/nonexistent/train.csv", f"--output_dir={tmp_path}",
            "--load_best_model_at_end", *flags]
    with pytest.raises(UserError, match=message):
        fine_tune_glue.main(argv)
    assert not os.listdir(tmp_path)  # nothing written, nothing loaded


def test_best_model_with_fractional_steps_and_task_metric(tmp_path, tiny_bert, glue_data):
    """0.3 / 0.1 is a float remainder that transformers' own check rejects; over 25 steps the Trainer would
    evaluate every ceil(2.5) = 3 steps but save every ceil(7.5) = 8. Saves must land on evaluations."""
    out = tmp_path / "best"
    args = [a for a in BASE if not a.startswith(("--max_steps", "--save_strategy"))]
    fine_tune_glue.main([f"--model_name_or_path={tiny_bert}", f"--output_dir={out}", *args, "--task_name=cola",
                         f"--data_dir={glue_data / 'CoLA'}", "--max_steps=25", "--load_best_model_at_end",
                         "--eval_strategy=steps", "--eval_steps=0.1", "--save_strategy=steps", "--save_steps=0.3"])
    saved = sorted(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert 9 in saved and all(step % 3 == 0 or step == 25 for step in saved), saved
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_metric"] == max(r["eval_matthews_correlation"] for r in state["log_history"]
                                       if "eval_matthews_correlation" in r)  # selected by MCC, not by loss


def test_auto_resume(tmp_path, tiny_bert, glue_data, caplog):
    import logging

    caplog.set_level(logging.INFO)
    args = ["--task_name=sst2", f"--data_dir={glue_data / 'SST-2'}", "--save_strategy=steps", "--save_steps=2"]
    run(tiny_bert, tmp_path / "o", *args)
    caplog.clear()
    metrics = run(tiny_bert, tmp_path / "o", *args, "--max_steps=4")
    assert "Resuming from" in caplog.text and metrics["epoch"] > 0
    assert json.loads((tmp_path / "o" / "trainer_state.json").read_text())["global_step"] == 4


@pytest.mark.parametrize("extra,message", [
    (["--task_name=sst3"], "did you mean sst2"),
    (["--task_name=imdb"], "use one of cola"),
    (["--task_name=rte", "--data_dir=DATA/RTE", "--do_predict"], "has no test.tsv, which --do_predict needs"),
    (["--task_name=sst2", "--data_dir=DATA/RTE"], "is GLUE's rte folder, but --task_name is sst2; pass --task_name rte"),
    (["--task_name=rte", "--data_dir=DATA/MRPC"], "is GLUE's mrpc folder, but --task_name is rte; pass --task_name mrpc"),
    (["--task_name=sst2", "--data_dir=DATA/renamed_rte"], "no column 'sentence'"),
    (["--task_name=mnli", "--data_dir=DATA/renamed_sst2"], "has no dev_matched.tsv"),
    (["--task_name=stsb", "--data_dir=DATA/renamed_rte"], "must be numbers"),
    (["--train_file=DATA/CSV"], "which columns hold the text"),
    (["--train_file=DATA/CSV", "--text_column_names=txt", "--label_column_name=y"], "no label column 'y'"),
    (["--task_name=sst2", "--data_dir=DATA/SST-2", "--max_seq_length=100"], "exceeds the model's limit of 64"),
    (["--task_name=sst2"], "could not load nyu-mll/glue"),
])
def test_bad_input_names_the_fix(tmp_path, tiny_bert, glue_data, extra, message):
    write_frame(pd.DataFrame({"txt": ["a b", "c d"], "label": [0, 1]}), glue_data / "plain.csv")
    for task, renamed in (("RTE", "renamed_rte"), ("SST-2", "renamed_sst2")):  # a task's files, not named by the task
        shutil.copytree(glue_data / task, glue_data / renamed, dirs_exist_ok=True)
    extra = [e.replace("DATA/CSV", str(glue_data / "plain.csv")).replace("DATA", str(glue_data)) for e in extra]
    with pytest.raises(UserError, match=message):
        run(tiny_bert, tmp_path / "o", *extra)


def test_cli_error_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "fine_tune_glue.py"), "--task_name=mrcp",
                           "--model_name_or_path=x"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == \
        ["error: unknown --task_name 'mrcp'; did you mean mrpc? (other data: drop --task_name)"]


# --- ../shared: MiniLM on the real GLUE files ------------------------------------------------------------

MINILM_ARGS = ["--report_to=none", "--disable_tqdm=True", "--seed=42", "--save_strategy=no", "--logging_steps=50"]


@pytest.mark.slow
def test_minilm_sst2_reaches_82_percent(tmp_path):
    model = shared_path("models", "minilm-l6-h384-uncased")
    metrics = fine_tune_glue.main([
        f"--model_name_or_path={model}", "--task_name=sst2", f"--data_dir={shared_path('data', 'glue', 'SST-2')}",
        "--max_train_samples=8000", "--num_train_epochs=1", "--per_device_train_batch_size=32",
        "--per_device_eval_batch_size=64", "--learning_rate=5e-5", f"--output_dir={tmp_path / 'sst2'}", *MINILM_ARGS,
    ])
    print(f"SST-2 dev accuracy {metrics['eval_accuracy']:.4f}, train {metrics['train_runtime']:.0f} s")
    assert metrics["eval_accuracy"] >= 0.82


@pytest.mark.slow
@pytest.mark.parametrize("task,folder,keys,extra", [
    ("cola", "CoLA", ["eval_matthews_correlation"], []),
    ("mrpc", "MRPC", ["eval_accuracy", "eval_f1", "eval_combined_score"], []),
    ("rte", "RTE", ["eval_accuracy"], []),
    ("stsb", "STS-B", ["eval_pearson", "eval_spearmanr", "eval_combined_score"], []),
    ("wnli", "WNLI", ["eval_accuracy"], []),
    ("qnli", "QNLI", ["eval_accuracy"], ["--train_file=QNLI/dev.tsv", "--validation_file=QNLI/dev.tsv"]),  # dev only
])
def test_minilm_smoke_on_every_shared_glue_task(tmp_path, task, folder, keys, extra):
    model = shared_path("models", "minilm-l6-h384-uncased")
    glue = shared_path("data", "glue")
    data = [e.replace("QNLI/", f"{glue}/QNLI/") for e in extra] or [f"--data_dir={glue}/{folder}"]
    metrics = fine_tune_glue.main([
        f"--model_name_or_path={model}", f"--task_name={task}", *data, "--max_train_samples=64",
        "--max_eval_samples=64", "--max_steps=4", "--per_device_train_batch_size=16", "--max_seq_length=64",
        f"--output_dir={tmp_path / task}", *MINILM_ARGS,
    ])
    assert all(key in metrics for key in keys), sorted(metrics)
    assert metrics["train_samples"] == 64 and metrics["eval_samples"] == 64
