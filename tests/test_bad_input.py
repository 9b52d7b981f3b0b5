"""Bad input, table-driven, across the three scripts and the sweep agent.

Each case must end with a non-zero exit and ONE error line that names the problem and the fix, with no
traceback, before any training starts, and without changing or deleting any user file. The scripts turn
every user mistake into a UserError, which `run_cli` prints as one `error:` line with exit status 2; the
in-process cases check the message and the side effects, the subprocess cases check the whole contract
end to end (exit code, stderr, no traceback).
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest

import run_mlm
import span_corruption
from arguments import UserError
from conftest import ROOT, TINY_BERT

TINY_T5 = ["--model_type=t5", "--config_overrides=d_model=32,d_ff=64,num_layers=1,num_decoder_layers=1,num_heads=2,d_kv=16",
           "--max_seq_length=32", "--report_to=none"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, text_corpus):
    """User files the cases point at; their bytes are checked after every case."""
    d = tmp_path_factory.mktemp("user_files")
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("the cat sat\n")
    (d / "one_line.txt").write_text("a single line of text that is long enough to fill a block " * 20 + "\n")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait, na\xefve r\xe9sum\xe9\n".encode("latin-1") * 50)
    (d / "data.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    (d / "a_folder.txt").mkdir()
    (d / "train.txt").write_text((text_corpus / "train.txt").read_text())
    (d / "valid.txt").write_text((text_corpus / "validation.txt").read_text())
    (d / "notes.json").write_text(json.dumps([{"body": "no text column here"}] * 20))
    (d / "cls_train.csv").write_text("sentence,label\n" + "".join(f"good movie {i},pos\nbad movie {i},neg\n" for i in range(20)))
    (d / "cls_nolabel.csv").write_text("sentence,score\n" + "".join(f"a film {i},1\n" for i in range(20)))
    (d / "cls_dev_newlabel.csv").write_text("sentence,label\n" + "".join(f"odd movie {i},meh\n" for i in range(5)))
    (d / "stsb_text.csv").write_text("sentence1,sentence2,label\n" + "".join(f"a {i},b {i},high\n" for i in range(10)))
    (d / "a_file_not_a_dir").write_text("I am a file")
    theirs = d / "someone_elses_dir"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("\\documentclass{article} my thesis")
    (d / "empty_glue_dir").mkdir()
    (d / "MRPC").mkdir()
    (d / "MRPC" / "train.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta b\tc d\n")
    (d / "data_folder").mkdir()
    (d / "data_folder" / "train.txt").write_text((text_corpus / "train.txt").read_text())
    # a BERT-style tokenizer (no T5 sentinels) and a T5-style one (no mask token) for the model checks
    texts = [[line for line in (text_corpus / "train.txt").read_text().splitlines() if line]]
    run_mlm.train_wordpiece_tokenizer(iter(texts), 300, 128, output_dir=str(d / "bert_tokenizer"))
    span_corruption.train_t5_unigram_tokenizer(iter(texts), 300, output_dir=str(d / "t5_tokenizer"))
    for name, body in {
        "bad_method.yaml": {"program": "run_mlm.py", "method": "bayesian", "metric": {"name": "eval/loss", "goal": "minimize"},
                            "parameters": {"learning_rate": {"min": 1.0e-5, "max": 1.0e-4}}},
        "bad_distribution.yaml": {"program": "run_mlm.py", "method": "random",
                                  "parameters": {"learning_rate": {"distribution": "loguniform", "min": 1.0e-5, "max": 1.0e-4}}},
        "no_metric.yaml": {"program": "run_mlm.py", "method": "bayes",
                           "parameters": {"learning_rate": {"min": 1.0e-5, "max": 1.0e-4}}},
        "no_program.yaml": {"program": "run_nothing.py", "method": "random",
                            "parameters": {"learning_rate": {"min": 1.0e-5, "max": 1.0e-4}}},
    }.items():
        import yaml

        (d / name).write_text(yaml.safe_dump(body))
    return d


def snapshot(folder):
    """Every user file's bytes and permissions, to prove nothing was changed or deleted."""
    state = {}
    for root, dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mode)
        for name in dirs:
            state[os.path.join(root, name)] = "dir"
    return state


MLM_DATA = ["--train_file={d}/train.txt", "--validation_file={d}/valid.txt"]
CASES = [
    # (id, script, args, words the message must contain: the problem and the fix)
    ("missing data file", "run_mlm", ["--train_file={d}/nope.txt"], ["does not exist", "check the path"]),
    ("empty data file", "run_mlm", ["--train_file={d}/empty.txt"], ["is empty", "give a file with data"]),
    ("unreadable data file (a folder)", "run_mlm", ["--train_file={d}/a_folder.txt"], ["is a folder", "holds no data files", "give .txt"]),
    ("non-UTF-8 data file", "run_mlm", ["--train_file={d}/latin1.txt"], ["not UTF-8", "iconv"]),
    ("unknown file extension", "run_mlm", ["--train_file={d}/data.xlsx"], ["unknown extension", ".txt"]),
    ("missing text column", "run_mlm", ["--train_file={d}/notes.json", "--text_column_name=text"], ["no column 'text'", "--text_column_name"]),
    ("misspelled flag", "run_mlm", ["--lerning_rate=1e-4"], ["unknown flag --lerning_rate", "did you mean --learning_rate"]),
    ("unknown flag", "run_span_t5", ["--frobnicate=3"], ["unknown flag --frobnicate"]),
    ("bad flag value", "run_mlm", ["--learning_rate=fast"], ["learning_rate", "fast"]),
    ("config_overrides with a pretrained model", "run_mlm",
     ["--model_name_or_path={d}/bert_tokenizer", "--config_overrides=hidden_size=64"], ["--config_overrides", "--model_type"]),
    ("unknown config key in config_overrides", "run_mlm", ["--config_overrides=hidden_sise=64", *MLM_DATA], ["hidden_sise", "valid keys"]),
    ("max_seq_length above the model's limit", "run_mlm", ["--max_seq_length=4096", *MLM_DATA], ["exceeds the model's limit", "use at most"]),
    ("tokenizer without mask token for MLM", "run_mlm", ["--tokenizer_name={d}/t5_tokenizer", *MLM_DATA], ["no mask token", "BERT"]),
    ("streaming without max_steps", "run_mlm", ["--streaming", *MLM_DATA], ["--streaming needs --max_steps"]),
    ("output_dir that is a file", "run_mlm", ["--output_dir={d}/a_file_not_a_dir", *MLM_DATA], ["is a file", "folder"]),
    ("output_dir with someone else's files", "run_mlm", ["--output_dir={d}/someone_elses_dir", *MLM_DATA],
     ["did not write", "choose an empty or new --output_dir"]),
    ("T5 tokenizer without sentinels", "run_span_t5", ["--tokenizer_name={d}/bert_tokenizer", *MLM_DATA], ["extra_id", "--tokenizer_name"]),
    ("noise density outside (0, 1)", "run_span_t5", ["--noise_density=1.5"], ["--noise_density", "0.15"]),
    ("fp16 for T5", "run_span_t5", ["--fp16", "--use_cpu"], ["overflows", "--bf16"]),
    ("unknown GLUE task", "fine_tune_glue", ["--task_name=sst3", "--model_name_or_path={d}/bert_tokenizer"], ["sst3", "sst2"]),
    ("GLUE data_dir without the files", "fine_tune_glue",
     ["--task_name=sst2", "--data_dir={d}/empty_glue_dir", "--model_name_or_path={d}/bert_tokenizer"], ["train.tsv"]),
    ("missing label column", "fine_tune_glue",
     ["--train_file={d}/cls_nolabel.csv", "--validation_file={d}/cls_nolabel.csv", "--model_name_or_path={d}/bert_tokenizer"],
     ["label", "column"]),
    ("label outside the model's label set", "fine_tune_glue",
     ["--train_file={d}/cls_train.csv", "--validation_file={d}/cls_dev_newlabel.csv", "--model_name_or_path={d}/bert_tokenizer"],
     ["meh", "labels"]),
    ("non-numeric stsb labels", "fine_tune_glue",
     ["--task_name=stsb", "--train_file={d}/stsb_text.csv", "--validation_file={d}/stsb_text.csv", "--model_name_or_path={d}/bert_tokenizer"],
     ["numbers", "regression"]),
    ("save_steps not a multiple of eval_steps", "fine_tune_glue",
     ["--task_name=sst2", "--model_name_or_path={d}/bert_tokenizer", "--load_best_model_at_end", "--eval_strategy=steps",
      "--eval_steps=30", "--save_steps=50"], ["save_steps", "multiple"]),
    ("model folder without a model", "run_mlm", ["--model_name_or_path={d}/data_folder", *MLM_DATA],
     ["no model config", "data_folder", "config.json"]),
    ("model folder without a model (T5)", "run_span_t5", ["--model_name_or_path={d}/data_folder", *MLM_DATA],
     ["no model config", "data_folder", "config.json"]),
    ("model folder without a model (GLUE)", "fine_tune_glue",
     ["--train_file={d}/cls_train.csv", "--validation_file={d}/cls_train.csv", "--model_name_or_path={d}/data_folder"],
     ["no model config", "data_folder", "config.json"]),
    ("GLUE task and data_dir of another task", "fine_tune_glue",
     ["--task_name=rte", "--data_dir={d}/MRPC", "--model_name_or_path={d}/bert_tokenizer"],
     ["MRPC", "mrpc folder", "--task_name mrpc"]),
    ("train/eval flag misspelled", "run_mlm", ["--per_device_batch_size=8"],
     ["did you mean --per_device_train_batch_size (or --per_device_eval_batch_size)?"]),
    ("validation file shorter than one block", "run_mlm", ["--train_file={d}/train.txt", "--validation_file={d}/short.txt"],
     ["--validation_file", "short.txt", "tokens, fewer than one block of 32", "--max_seq_length"]),
    ("training file shorter than one block (T5)", "run_span_t5", ["--train_file={d}/short.txt", "--validation_file={d}/valid.txt"],
     ["--train_file", "short.txt", "tokens, fewer than one block of", "--max_seq_length"]),
    ("streamed training file shorter than one block", "run_mlm", ["--train_file={d}/short.txt", "--streaming", "--max_steps=3"],
     ["--train_file", "short.txt", "fewer than one block of 32"]),
    ("one-line training file, no validation file", "run_mlm", ["--train_file={d}/one_line.txt"],
     ["1 example", "--validation_file"]),
    ("GLUE without model or data", "fine_tune_glue", [],
     ["needs a model (--model_name_or_path", "and data (--task_name", "--train_file", "--model_name_or_path bert-base-uncased"]),
    ("GLUE without a model", "fine_tune_glue", ["--task_name=mrpc"], ["needs a model (--model_name_or_path"]),
    ("sweep: bad method", "sweep", ["{d}/bad_method.yaml"], ["method", "bayes"]),
    ("sweep: bad distribution", "sweep", ["{d}/bad_distribution.yaml"], ["loguniform", "log_uniform_values"]),
    ("sweep: metric name missing", "sweep", ["{d}/no_metric.yaml"], ["metric"]),
    ("sweep: program does not exist", "sweep", ["{d}/no_program.yaml"], ["run_nothing.py"]),
]


def script_args(script, args, d, out):
    args = [a.format(d=d) for a in args]
    if script == "sweep":
        return args + ["--count=1", f"--sweep-dir={out}", "--no-plots"]
    base = {"run_mlm": TINY_BERT, "run_span_t5": TINY_T5, "fine_tune_glue": ["--report_to=none", "--max_seq_length=32"]}[script]
    if not any(a.startswith("--output_dir") for a in args):
        args.append(f"--output_dir={out}")
    if any(a.startswith("--model_name_or_path") for a in args):  # a model of its own: no from-scratch settings
        base = [a for a in base if not a.startswith(("--model_type", "--config_overrides"))]
    return [*base, *args]


@pytest.mark.parametrize("case,script,args,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, script, args, words, files, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    before = snapshot(files)
    out = tmp_path / "out"
    argv = script_args(script, args, files, out)
    module = __import__(script)
    if script == "sweep":
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), *argv], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        message = "\n".join(line for line in proc.stderr.splitlines() if "error" in line.lower())
        assert len(message.splitlines()) == 1, proc.stderr
    else:
        with pytest.raises(UserError) as info:
            module.main(argv)
        message = str(info.value)
        assert "\n" not in message, "one line"
    for word in words:
        assert word.lower() in message.lower(), f"{case}: {word!r} not in {message!r}"
    assert snapshot(files) == before, "a user file was changed or deleted"
    assert not list(out.rglob("trainer_state.json")) and not list(out.rglob("checkpoint-*")), "training had started"
    if script != "sweep" and "output_dir" not in case:
        assert not out.exists(), "a failed run left a folder behind"


@pytest.mark.parametrize("script,args", [
    ("run_mlm.py", ["--mlm_probability=2"]),
    ("run_span_t5.py", ["--noise_density=0"]),
    ("fine_tune_glue.py", ["--task_name=qqq"]),
])
def test_cli_prints_one_line_and_exits_2(script, args, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args, f"--output_dir={tmp_path}/o"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1, proc.stderr


def test_bare_glue_run_answers_before_the_slow_imports(tmp_path):
    """`python fine_tune_glue.py` alone: one error line naming everything it needs, with two commands to copy,
    given before transformers is imported (it used to take two 11-15 s round trips: model, then data)."""
    probe = ("import runpy, sys; sys.argv = ['fine_tune_glue.py']\n"
             "try:\n    runpy.run_path('fine_tune_glue.py', run_name='__main__')\n"
             "except SystemExit as e:\n    print('exit', e.code, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.strip() == "exit 2 False", proc.stdout + proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: fine_tune_glue.py needs a model (--model_name_or_path") and "and data (" in line
    assert line.count("python fine_tune_glue.py --model_name_or_path") == 2
