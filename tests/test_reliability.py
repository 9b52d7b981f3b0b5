"""Interrupted runs lose nothing: signals checkpoint and stop, a rerun resumes exactly, NaN stops cleanly."""

import json
import math
import os
import signal

import pytest
from transformers import TrainerCallback

import run_folder
import run_mlm
import throughput
import train_utils
from arguments import UserError, to_config_dict
from conftest import TINY_BERT


class SignalAtStep(TrainerCallback):
    """Send ourselves a signal in the middle of a step, as a scheduler would."""

    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def final_loss(output_dir):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    return losses[-1]


def interrupt(main, argv, step, signum, monkeypatch):
    """Run `main(argv)` with `signum` sent in the middle of step `step + 1`; it must exit with 128 + signum."""
    original_train = train_utils.train

    def train_with_signal(trainer, resume_from_checkpoint=None):
        trainer.add_callback(SignalAtStep(step, signum))
        return original_train(trainer, resume_from_checkpoint)

    monkeypatch.setattr(train_utils, "train", train_with_signal)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
    finally:
        monkeypatch.setattr(train_utils, "train", original_train)
    assert exit_info.value.code == 128 + signum


def mlm_args(tmp_path, corpus, name):
    return [*TINY_BERT, f"--output_dir={tmp_path / name}", "--max_steps=8", "--save_steps=100",
            f"--train_file={corpus / 'train.txt'}", f"--validation_file={corpus / 'validation.txt'}", "--seed=7"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_mlm_signal_checkpoints_and_resume_matches_uninterrupted(tmp_path, text_corpus, monkeypatch, signum):
    run_mlm.main(mlm_args(tmp_path, text_corpus, "straight"))
    reference = final_loss(tmp_path / "straight")

    interrupt(run_mlm.main, mlm_args(tmp_path, text_corpus, "cut"), 3, signum, monkeypatch)
    assert (tmp_path / "cut" / "checkpoint-4").is_dir()  # the step in flight was finished, then saved

    run_mlm.main(mlm_args(tmp_path, text_corpus, "cut"))  # the same command resumes
    resumed = final_loss(tmp_path / "cut")
    print(f"run_mlm final loss at step {reference[0]}: uninterrupted {reference[1]:.6f}, resumed {resumed[1]:.6f}")
    assert resumed[0] == reference[0] == 8
    assert abs(resumed[1] - reference[1]) < 1e-4, (resumed, reference)


def test_span_t5_sigterm_resume_matches_uninterrupted(tmp_path, text_corpus, monkeypatch):
    """The same for run_span_t5.py: its noise masks are drawn per batch, so a resumed run must draw the
    masks the uninterrupted run drew for the batches after the checkpoint."""
    import run_span_t5
    from test_run_span_t5 import TINY_T5

    def t5_args(name):
        return [*TINY_T5, f"--output_dir={tmp_path / name}", "--max_steps=8", "--save_steps=100", "--seed=7",
                "--do_train", f"--train_file={text_corpus / 'train.txt'}"]

    run_span_t5.main(t5_args("straight"))
    reference = final_loss(tmp_path / "straight")

    interrupt(run_span_t5.main, t5_args("cut"), 5, signal.SIGTERM, monkeypatch)
    assert (tmp_path / "cut" / "checkpoint-6").is_dir()

    run_span_t5.main(t5_args("cut"))
    cut_history = json.loads((tmp_path / "cut" / "trainer_state.json").read_text())["log_history"]
    straight_history = json.loads((tmp_path / "straight" / "trainer_state.json").read_text())["log_history"]
    # Steps 7 and 8 ran after the resume: their losses match the uninterrupted run's step for step,
    # which they would not if the data order or the noise masks had restarted.
    after = {h["step"]: h["loss"] for h in cut_history if "loss" in h and h["step"] > 6}
    expected = {h["step"]: h["loss"] for h in straight_history if "loss" in h and h["step"] > 6}
    assert sorted(after) == sorted(expected) == [7, 8]
    for step in after:
        assert abs(after[step] - expected[step]) < 1e-4, (step, after[step], expected[step])
    resumed = final_loss(tmp_path / "cut")
    print(f"run_span_t5 final loss at step {reference[0]}: uninterrupted {reference[1]:.6f}, resumed {resumed[1]:.6f}")
    assert resumed[0] == reference[0] == 8 and abs(resumed[1] - reference[1]) < 1e-4


def script_args(script, tmp_path, corpus, name, *extra):
    from test_run_span_t5 import TINY_T5

    tiny = TINY_BERT if script == "run_mlm" else TINY_T5
    return [*tiny, f"--output_dir={tmp_path / name}", "--max_steps=8", "--save_steps=100", "--seed=7",
            f"--train_file={corpus / 'train.txt'}", f"--validation_file={corpus / 'validation.txt'}", *extra]


def train_losses(output_dir):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.parametrize("script", ["run_mlm", "run_span_t5"])
def test_evaluation_never_moves_the_training_masks_and_resume_stays_exact(tmp_path, text_corpus, monkeypatch, script):
    """Evaluating during training draws its masks (MLM) or noise (T5) from a stream of its own: training with
    evaluations every 2 steps gives the losses of training without them, also when stopped at step 3 and resumed."""
    main = __import__(script).main
    evaluating = ["--eval_strategy=steps", "--eval_steps=2"]
    main(script_args(script, tmp_path, text_corpus, "plain", "--do_train"))
    main(script_args(script, tmp_path, text_corpus, "evaluated", *evaluating))
    interrupt(main, script_args(script, tmp_path, text_corpus, "cut", *evaluating), 3, signal.SIGTERM, monkeypatch)
    main(script_args(script, tmp_path, text_corpus, "cut", *evaluating))
    plain, evaluated, cut = (train_losses(tmp_path / name) for name in ("plain", "evaluated", "cut"))
    assert sorted(plain) == sorted(evaluated) == sorted(cut) == list(range(1, 9))
    for step in plain:
        assert evaluated[step] == pytest.approx(plain[step], abs=1e-5), step
        assert cut[step] == pytest.approx(plain[step], abs=1e-4), step


@pytest.mark.parametrize("script", ["run_mlm", "run_span_t5"])
def test_the_same_weights_always_score_the_same(tmp_path, text_corpus, script):
    """The eval loss at the end of training equals the eval loss of the saved model evaluated alone, twice: eval
    masks depend only on the eval data and the seed, not on how many batches came before."""
    main = __import__(script).main
    trained = main(script_args(script, tmp_path, text_corpus, "trained", "--do_train", "--do_eval"))
    tiny = [a for a in (TINY_BERT if script == "run_mlm" else __import__("test_run_span_t5").TINY_T5)
            if not a.startswith(("--model_type", "--config_overrides", "--tokenizer_vocab_size"))]
    again = [main([*tiny, f"--model_name_or_path={tmp_path / 'trained'}", "--do_eval", "--seed=7",
                   f"--validation_file={text_corpus / 'validation.txt'}", f"--output_dir={tmp_path / name}"])
             for name in ("eval1", "eval2")]
    assert again[0]["eval_loss"] == again[1]["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)
    assert again[0]["eval_accuracy"] == trained["eval_accuracy"]


def test_incomplete_checkpoint_is_skipped(tmp_path, text_corpus, caplog):
    args = mlm_args(tmp_path, text_corpus, "out") + ["--save_steps=2"]
    run_mlm.main([a for a in args if not a.startswith("--max_steps")] + ["--max_steps=4"])
    out = tmp_path / "out"
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut off mid-write
    assert run_folder.find_resume_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert "Skipping incomplete checkpoint" in caplog.text


def test_nan_loss_stops_with_hint(tmp_path, text_corpus):
    args = mlm_args(tmp_path, text_corpus, "nan") + ["--learning_rate=1e30", "--max_grad_norm=0"]
    with pytest.raises(UserError, match=r"loss became .* Last good checkpoint.*learning_rate"):
        run_mlm.main(args)


def test_tokens_never_reach_logs_or_saved_files(tmp_path, text_corpus, capsys):
    secret = "hf_SECRETtoken123"
    args = mlm_args(tmp_path, text_corpus, "tok") + [f"--token={secret}", "--max_steps=2", "--save_steps=1"]
    run_mlm.main(args)
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err
    for path in (tmp_path / "tok").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"token leaked into {path}"
    config = to_config_dict(*[type("A", (), {"to_dict": lambda self: {"token": secret}})()])
    assert config["token"] == "<hidden>"  # what goes to the W&B run config


def test_trust_remote_code_is_off_by_default():
    from arguments import ModelArguments

    assert ModelArguments().trust_remote_code is False


@pytest.mark.parametrize("bf16_units", [False, True])
def test_bf16_without_bf16_units_warns_once_naming_fp32_and_runs(tmp_path, text_corpus, monkeypatch, capsys, bf16_units):
    monkeypatch.setattr(throughput, "cpu_has_bf16_matmul", lambda: bf16_units)
    metrics = run_mlm.main(mlm_args(tmp_path, text_corpus, "bf16") + ["--bf16", "--max_steps=2"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--bf16" in line]
    assert math.isfinite(metrics["eval_loss"])
    assert warnings == ([] if bf16_units else [
        "warning: --bf16 on a CPU without bf16 matrix units (AVX512-BF16 or AMX) runs several times slower than "
        "fp32; drop --bf16 for speed"])


def no_output_dir(args):
    return [a for a in args if not a.startswith("--output_dir")]


def test_the_same_command_without_output_dir_finds_its_folder_and_resumes(tmp_path, text_corpus, monkeypatch, capsys):
    """Without --output_dir the folder is named by the script and the settings given, so the same command, rerun
    after a stop, resumes there; rerun after the end, it says the run finished; --overwrite_output_dir trains again."""
    args = no_output_dir(mlm_args(tmp_path, text_corpus, "unused"))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    run_mlm.main(args)
    (folder,) = (tmp_path / "a" / "outputs").iterdir()
    reference = final_loss(folder)

    monkeypatch.chdir(tmp_path / "b")
    interrupt(run_mlm.main, args, 3, signal.SIGINT, monkeypatch)
    run_mlm.main(args)
    assert [p.name for p in (tmp_path / "b" / "outputs").iterdir()] == [folder.name]
    assert final_loss(tmp_path / "b" / "outputs" / folder.name) == pytest.approx(reference, abs=1e-4)
    history = json.loads((tmp_path / "b" / "outputs" / folder.name / "trainer_state.json").read_text())["log_history"]
    assert min(h["step"] for h in history if "loss" in h) == 1  # the resumed run kept the first 4 steps' logs

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_mlm.main(args)
    assert exit_info.value.code == 0
    assert "This run already finished" in capsys.readouterr().out

    run_mlm.main(args + ["--overwrite_output_dir"])  # starts fresh: all 8 steps trained again, same result
    assert final_loss(tmp_path / "b" / "outputs" / folder.name) == pytest.approx(reference, abs=1e-4)


def test_default_folder_depends_on_the_settings_given_not_their_order():
    config = {"learning_rate": 1e-3, "seed": 7, "logging_steps": 5, "output_dir": "trainer_output"}
    name = run_folder.default_output_dir("run_mlm", config, {"learning_rate", "seed"})
    assert name.startswith(os.path.join("outputs", "run_mlm-"))
    assert run_folder.default_output_dir("run_mlm", config, {"seed", "learning_rate", "logging_steps"}) == name
    assert run_folder.default_output_dir("run_mlm", dict(config, seed=8), {"learning_rate", "seed"}) != name
    assert run_folder.default_output_dir("run_span_t5", config, {"learning_rate", "seed"}) != name


@pytest.mark.slow
def test_readme_main_command_interrupted_by_ctrl_c_and_rerun_ends_like_an_uninterrupted_run(tmp_path):
    """The README's `python run_mlm.py`, stopped with Ctrl-C during training and run again exactly as written,
    resumes and ends with the eval perplexity of an uninterrupted run."""
    import subprocess
    import sys

    from conftest import ROOT

    script = os.path.join(ROOT, "run_mlm.py")
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def perplexity(cwd):
        (folder,) = (cwd / "outputs").iterdir()
        return json.loads((folder / "all_results.json").read_text())["perplexity"], folder.name

    for name in ("straight", "cut"):
        (tmp_path / name).mkdir()
    subprocess.run([sys.executable, script], cwd=tmp_path / "straight", env=env, check=True, capture_output=True)
    cut = subprocess.Popen([sys.executable, script], cwd=tmp_path / "cut", env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in cut.stdout:  # the first loss log: training is under way
        if "'loss'" in line:
            cut.send_signal(signal.SIGINT)
            break
    output = line + cut.stdout.read()
    assert cut.wait() == 128 + signal.SIGINT, output
    assert "Run the same command again to resume" in output
    again = subprocess.run([sys.executable, script], cwd=tmp_path / "cut", env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "Resuming from" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    (straight, straight_name), (resumed, resumed_name) = perplexity(tmp_path / "straight"), perplexity(tmp_path / "cut")
    print(f"README command: uninterrupted perplexity {straight:.4f}, interrupted and rerun {resumed:.4f}")
    assert straight_name == resumed_name
    assert resumed == pytest.approx(straight, rel=1e-4)


@pytest.mark.parametrize("script", ["run_mlm", "run_span_t5"])
def test_a_resumed_run_says_it_resumes_without_false_warnings(tmp_path, text_corpus, monkeypatch, caplog, script):
    """No 'Training from scratch' and no 'missing keys' for tied weights (saved once, under the shared weight)."""
    main = __import__(script).main
    args = script_args(script, tmp_path, text_corpus, "cut", "--do_train")
    interrupt(main, args, 3, signal.SIGTERM, monkeypatch)
    caplog.clear()
    main(args)
    assert "Resuming from" in caplog.text
    assert "Training from scratch" not in caplog.text and "missing keys" not in caplog.text, caplog.text


def test_wandb_gets_peak_memory_and_one_tokens_per_second_key(tmp_path, text_corpus, monkeypatch):
    """What an offline W&B run is given: train/peak_memory_mb (as the README says) and train/tokens_per_second,
    not transformers' train/train_tokens_per_second beside it."""
    import wandb

    logged = {}
    original_log = wandb.sdk.wandb_run.Run.log

    def log(run, data, *args, **kwargs):
        logged.update(data)
        return original_log(run, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [a for a in mlm_args(tmp_path, text_corpus, "out") if a != "--report_to=none"]
    try:
        run_mlm.main(args + ["--report_to=wandb", "--do_train"])
    finally:
        wandb.finish()
    assert logged["train/peak_memory_mb"] > 0 and logged["train/tokens_per_second"] > 0
    assert not [key for key in logged if key.endswith("train_tokens_per_second")], sorted(logged)
