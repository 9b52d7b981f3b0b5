"""--help tells the truth: where a script sets its own default, --help shows that default, not transformers'."""

import dataclasses
import re
import subprocess
import sys

import pytest
from transformers import Seq2SeqTrainingArguments

import train_utils
from conftest import ROOT

SCRIPTS = {  # flags that get each script past its "what is missing" checks, and change no default
    "run_mlm": ["--seed=42"],
    "run_span_t5": ["--seed=42"],
    "fine_tune_glue": ["--model_name_or_path=some-model", "--task_name=sst2"],
}


class Parsed(Exception):
    """Raised where a script starts logging: every default is set by then."""


def settings_in_effect(script, argv, monkeypatch):
    captured = {}

    def stop(training_args):
        captured["args"] = training_args
        raise Parsed

    monkeypatch.setattr(train_utils, "setup_logging", stop)
    with pytest.raises(Parsed):
        __import__(script).main(argv)
    return captured["args"]


def help_defaults(script):
    text = subprocess.run([sys.executable, f"{script}.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, check=True).stdout
    entries = re.split(r"\n  (?=--)", text)
    found = {}
    for entry in entries:
        name = re.match(r"--(\w+)", entry)
        default = re.search(r"\(default:\s*(.*?)\)\s*$", " ".join(entry.split()))
        if name and default:
            found[name.group(1)] = default.group(1)
    return found


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_shows_each_default_the_script_changes(script, monkeypatch):
    used = settings_in_effect(script, SCRIPTS[script], monkeypatch)
    plain = Seq2SeqTrainingArguments()  # transformers' defaults, after its own normalising
    shown = help_defaults(script)
    changed = [f.name for f in dataclasses.fields(plain) if f.init and f.name in shown and f.name != "output_dir"
               and getattr(used, f.name) != getattr(plain, f.name)]
    assert "logging_steps" in changed  # the check sees the script's changes
    for name in changed:
        assert shown[name] != str(getattr(plain, name)) or str(getattr(used, name)) == shown[name], \
            f"--{name}: --help says {shown[name]!r}, the script uses {getattr(used, name)!r}"
    assert shown["output_dir"].startswith("outputs/<script>-<hash")
    if script == "fine_tune_glue":
        assert shown["train_sampling_strategy"] == "group_by_length" and shown["max_seq_length"] == "128"
    if script == "run_span_t5":
        assert shown["learning_rate"].startswith("1e-2 with --t5_optimizer adafactor")
