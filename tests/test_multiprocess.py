"""Several processes: each script under torchrun and under accelerate launch (2 CPU processes, gloo) matches a
single-process run with the same global batch and writes its files once; a stop signal to a 2-process run
leaves one complete checkpoint; the DeepSpeed, accelerate and Slurm files are sound.

Ranks are processes, so these tests launch subprocesses: 2 processes x batch B/2 against 1 x batch B, same
seed, 12 steps inside the first epoch (at an epoch's end DDP pads the last batch, one process shortens it),
dropout 0. Each launch costs 20-40 s on 2 cores (two interpreters import torch and transformers): slow.

Tolerances. fine_tune_glue has no randomness left once dropout is 0 and the data order is shared, so the two
runs must agree to float rounding (1e-4). run_mlm and run_span_t5 draw their masks per rank and batch
(data_utils.BatchSeeds), so the two runs see the same text under different masks: they agree only as closely
as two single-process runs whose masks alone differ. Measured over four such runs: the final eval loss
spreads over 0.027 nats (MLM) and 0.05 (T5), against 0.6 and 3.2 nats of progress in 12 steps; the loss at
step 0 (same weights, only the eval masks differ) over 0.008 and 0.019. The bounds are about three times
those spreads, and each is checked to be well under the run's own progress. Step and token counts must
match exactly: ranks that each trained alone, what a CPU-only torchrun did before arguments.py turned on
--use_cpu there, see half the tokens.
"""

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml

import run_folder
import run_mlm
import throughput
import train_utils
from conftest import ROOT, SENTENCES

STEPS = 12
LAUNCH_TIMEOUT = 420
MLM_FLAGS = [
    "--model_type=bert", "--config_overrides=hidden_size=32,num_hidden_layers=1,num_attention_heads=2,"
    "intermediate_size=64,max_position_embeddings=128,hidden_dropout_prob=0,attention_probs_dropout_prob=0",
    "--tokenizer_vocab_size=400", "--max_seq_length=32", "--learning_rate=3e-3",
]
T5_FLAGS = [
    "--model_type=t5", "--config_overrides=d_model=32,d_kv=16,num_heads=2,d_ff=64,num_layers=1,"
    "feed_forward_proj=gated-gelu,tie_word_embeddings=false,dropout_rate=0.0",
    "--tokenizer_vocab_size=300", "--max_seq_length=32", "--learning_rate=1e-2",
]
COMMON = [
    f"--max_steps={STEPS}", f"--save_steps={STEPS // 2}", "--logging_steps=1", "--eval_on_start", "--seed=1",
    "--per_device_eval_batch_size=16", "--report_to=none", "--disable_tqdm=True",
]
# script -> (its flags, global batch, how the runs must agree: None = to rounding, else (bound at step 0, final))
SCRIPTS = {
    "run_mlm": (MLM_FLAGS, 32, (0.03, 0.08)),
    "run_span_t5": (T5_FLAGS, 32, (0.06, 0.15)),
    "fine_tune_glue": (["--task_name=sst2", "--max_seq_length=32", "--learning_rate=1e-2"], 8, None),
}
CASES = [pytest.param(script, launcher, marks=pytest.mark.slow, id=f"{script}-{launcher}")
         for script in SCRIPTS for launcher in ("torchrun", "accelerate")]


def need_script(name):
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A text corpus (MLM, T5) and a tiny sst2-style task with a tiny BERT checkpoint (GLUE), dropout 0."""
    import torch
    from transformers import BertConfig, BertModel


    folder = tmp_path_factory.mktemp("mp_data")
    lines = [f"{SENTENCES[i % len(SENTENCES)]} number {i % 17}" for i in range(1500)]
    (folder / "train.txt").write_text("\n".join(lines[:1200]) + "\n", encoding="utf-8")
    (folder / "validation.txt").write_text("\n".join(lines[1200:]) + "\n", encoding="utf-8")
    for name, rows in (("train", range(128)), ("dev", range(200, 216))):
        text = "".join(f"{lines[i]} {'good' if i % 3 else 'bad'}\t{int(i % 3 > 0)}\n" for i in rows)
        (folder / f"{name}.tsv").write_text("sentence\tlabel\n" + text, encoding="utf-8")
    tokenizer = run_mlm.train_wordpiece_tokenizer([lines + ["good bad"]], 300, 64)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    return folder


def script_args(script, data, output_dir, processes):
    if script == "fine_tune_glue":
        files = [f"--model_name_or_path={data / 'bert'}", f"--train_file={data / 'train.tsv'}",
                 f"--validation_file={data / 'dev.tsv'}"]
    else:
        files = [f"--train_file={data / 'train.txt'}", f"--validation_file={data / 'validation.txt'}"]
    return [*SCRIPTS[script][0], *files, *COMMON, f"--per_device_train_batch_size={SCRIPTS[script][1] // processes}",
            f"--output_dir={output_dir}"]


@pytest.fixture(scope="module")
def single_process(data, tmp_path_factory):
    """The single-process reference run of a script, in-process, once per module."""
    done = {}

    def run(script):
        if script not in done:
            module = need_script(script)
            out = tmp_path_factory.mktemp(f"single_{script}")
            sweep_file = out / "sweep_metrics.jsonl"
            os.environ["SWEEP_METRICS_FILE"] = str(sweep_file)
            try:
                module.main(script_args(script, data, out / "run", processes=1))
            finally:
                del os.environ["SWEEP_METRICS_FILE"]
            done[script] = SimpleNamespace(out=out / "run", sweep_file=sweep_file)
        return done[script]

    return run


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(launcher):
    if launcher == "torchrun":  # --standalone: a free local port, so parallel test runs do not collide
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # The shipped multi-GPU config: on a machine without GPUs arguments.py turns on --use_cpu, so the two
    # processes form a gloo group. (`accelerate launch --cpu --num_processes 2` starts only one process.)
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", os.path.join(ROOT, "configs", "accelerate", "multi_gpu.yaml"),
            "--num_processes=2", f"--main_process_port={free_port()}"]


def launch_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", **extra)
    return env


def history(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def files_of(folder):
    return {p.name for p in folder.iterdir()}


def assert_written_once(multi, single, stdout):
    """One set of results and checkpoints, each file whole: what the single-process run writes, plus one RNG
    state per rank in each checkpoint (each rank's own generator, for an exact resume)."""
    assert files_of(multi.out) == files_of(single.out)
    for name in ("run_info.json", "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json"):
        json.loads((multi.out / name).read_text())  # a second writer would leave duplicated or torn JSON
    checkpoints = sorted(p.name for p in multi.out.glob("checkpoint-*"))
    assert checkpoints == sorted(f"checkpoint-{s}" for s in (STEPS // 2, STEPS))
    for name in checkpoints:
        per_rank = {"rng_state_0.pth", "rng_state_1.pth"}
        assert files_of(multi.out / name) == files_of(single.out / name) - {"rng_state.pth"} | per_rank
        assert run_folder._checkpoint_problem(str(multi.out / name)) is None
    assert not [p for p in multi.out.rglob("*") if ".tmp" in p.name]
    for split in ("train", "eval"):  # printed once, by rank 0
        assert stdout.count(f"***** {split} metrics *****") == 1
    records = [json.loads(line) for line in multi.sweep_file.read_text().splitlines()]
    assert len(records) == len(single.sweep_file.read_text().splitlines())  # each log record once


@pytest.mark.parametrize("script,launcher", CASES)
def test_two_processes_match_one_with_the_same_global_batch(script, launcher, data, single_process, tmp_path):
    need_script(script)
    single = single_process(script)
    multi = SimpleNamespace(out=tmp_path / "run", sweep_file=tmp_path / "sweep_metrics.jsonl")
    command = [*launcher_command(launcher), os.path.join(ROOT, f"{script}.py"),
               *script_args(script, data, multi.out, processes=2)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=LAUNCH_TIMEOUT,
                          env=launch_env(SWEEP_METRICS_FILE=str(multi.sweep_file)))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "find_unused_parameters=True" not in proc.stdout + proc.stderr  # DDP's search is off: all weights used
    assert_written_once(multi, single, proc.stdout)

    one, two = history(single.out), history(multi.out)
    assert [h["step"] for h in two if "loss" in h] == [h["step"] for h in one if "loss" in h] == list(range(1, STEPS + 1))
    assert two[-1]["epoch"] == pytest.approx(one[-1]["epoch"]) and one[-1]["epoch"] < 1  # same global batch
    one_results = json.loads((single.out / "all_results.json").read_text())
    two_results = json.loads((multi.out / "all_results.json").read_text())
    start = [next(h["eval_loss"] for h in run if "eval_loss" in h) for run in (one, two)]
    final = [one_results["eval_loss"], two_results["eval_loss"]]
    train_losses = [[h["loss"] for h in run if "loss" in h] for run in (one, two)]
    print(f"\n{script} {launcher}: eval loss at step 0 {start[0]:.4f} vs {start[1]:.4f}, after {STEPS} steps "
          f"{final[0]:.4f} vs {final[1]:.4f}; train loss {[round(x, 4) for x in train_losses[0]]} vs "
          f"{[round(x, 4) for x in train_losses[1]]} (1 process vs 2)")

    bounds = SCRIPTS[script][2]
    if bounds is None:
        assert train_losses[1] == pytest.approx(train_losses[0], abs=1e-4)
        assert final[1] == pytest.approx(final[0], abs=1e-4) and start[1] == pytest.approx(start[0], abs=1e-4)
    else:
        # Fixed shapes: every token of the global batch is counted once, over both ranks.
        assert two[-1]["num_input_tokens_seen"] == one[-1]["num_input_tokens_seen"]
        start_bound, final_bound = bounds
        assert start[0] - final[0] > 1.5 * final_bound, "the run must learn more than the tolerance"
        assert abs(start[1] - start[0]) < start_bound
        assert abs(final[1] - final[0]) < final_bound


def test_a_finished_two_process_run_rerun_exits_on_every_rank(data, tmp_path):
    """Each process compares its settings with the finished run's (its own local_rank left out): every rank finds
    the run finished and exits 0 (rank 0 says so), none waits for a partner that has left."""
    need_script("run_mlm")
    command = [*launcher_command("torchrun"), os.path.join(ROOT, "run_mlm.py"),
               *script_args("run_mlm", data, tmp_path / "run", processes=2)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=LAUNCH_TIMEOUT, env=launch_env())
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=LAUNCH_TIMEOUT, env=launch_env())
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.count("This run already finished") == 1, again.stdout[-4000:]  # said once, by rank 0


def read_until(proc, marker, timeout):
    """stdout lines of `proc` until one holds `marker` (or the process ends, or time runs out)."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    return "".join(seen)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "one rank"])
def test_stop_signal_gives_one_checkpoint_and_both_ranks_exit(target, data, tmp_path):
    """SIGTERM to torchrun (what `kill` and the Slurm script do) reaches both ranks; SIGUSR1 to rank 1 alone
    reaches rank 0 through the all-reduced stop flag. Either way both stop at one step, rank 0 writes one
    checkpoint while rank 1 waits, and both exit by themselves (torchrun needs to kill nobody)."""
    import psutil

    out = tmp_path / "run"
    args = [*MLM_FLAGS, f"--train_file={data / 'train.txt'}", f"--validation_file={data / 'validation.txt'}",
            "--max_steps=100000", "--save_steps=100000", "--logging_steps=1", "--report_to=none",
            "--disable_tqdm=True", "--per_device_train_batch_size=4", f"--output_dir={out}"]
    command = [*launcher_command("torchrun"), os.path.join(ROOT, "run_mlm.py"), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=launch_env(), start_new_session=True)
    try:
        before = read_until(proc, "'loss'", LAUNCH_TIMEOUT)
        assert "'loss'" in before, before[-4000:]
        if target == "launcher":
            proc.send_signal(signal.SIGTERM)
        else:
            rank1 = next(p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1")
            rank1.send_signal(signal.SIGUSR1)
        signalled = time.monotonic()
        after, _ = proc.communicate(timeout=120)
        seconds = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = before + after
    assert proc.returncode != 0  # stopped early: a scheduler must be able to tell
    assert log.count("Interrupted by signal") == 1 and "Run the same command again to resume" in log
    assert "exiting now without a checkpoint" not in log  # torchrun's forwarded copy is no second signal
    assert "forcefully exiting" not in log and seconds < 60  # both ranks left by themselves
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1
    assert run_folder.find_resume_checkpoint(str(out)) == str(checkpoints[0])
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= files_of(checkpoints[0])


# --- DeepSpeed, accelerate and Slurm files -------------------------------------------------------------

def deepspeed_filler(path):
    """transformers' own HfTrainerDeepSpeedConfig, which replaces every "auto" it knows with the Trainer's
    value. Without deepspeed installed the class is a stub, so its methods are borrowed onto accelerate's
    config reader, which needs no deepspeed."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, is_deepspeed_available

    if is_deepspeed_available():
        return HfTrainerDeepSpeedConfig(path)
    methods = ("is_auto", "fill_match", "fill_only", "trainer_config_process", "trainer_config_finalize")
    filler = type("Filler", (HfDeepSpeedConfig,), {m: HfTrainerDeepSpeedConfig.__dict__[m] for m in methods})(path)
    filler.mismatches, filler._dtype = [], None
    return filler


def auto_keys(node, prefix=""):
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in auto_keys(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_takes_every_auto_value_from_the_flags(stage, tmp_path):
    from transformers import TrainingArguments

    path = os.path.join(ROOT, "configs", "deepspeed", f"zero{stage}.json")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    assert raw["zero_optimization"]["stage"] == stage
    # No optimizer or scheduler section: the Trainer builds both from --optim, --learning_rate, --weight_decay,
    # --lr_scheduler_type and --warmup_steps (run_span_t5's own optimizers included), as without DeepSpeed.
    assert "optimizer" not in raw and "scheduler" not in raw
    assert {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
            "gradient_clipping", "bf16.enabled", "fp16.enabled"} <= set(auto_keys(raw))

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=6, gradient_accumulation_steps=3,
                             max_grad_norm=0.5, bf16=True, use_cpu=True, report_to="none")
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=64))
    filler = deepspeed_filler(path)
    filler.trainer_config_process(args)
    filler.trainer_config_finalize(args, model, num_training_steps=100)
    assert auto_keys(filler.config) == [] and filler.mismatches == []
    config = filler.config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (6, 3)
    assert config["train_batch_size"] == 6 * 3 * args.world_size and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    if stage == 3:  # save_model writes an ordinary model.safetensors, not only sharded DeepSpeed state
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_accelerate_configs_leave_precision_to_the_flags():
    from accelerate.commands.config.config_args import load_config_from_file

    single = load_config_from_file(os.path.join(ROOT, "configs", "accelerate", "multi_gpu.yaml"))
    multi = load_config_from_file(os.path.join(ROOT, "configs", "accelerate", "multi_node.yaml"))
    for config in (single, multi):
        assert config.distributed_type.value == "MULTI_GPU" and config.mixed_precision == "no"
    assert single.num_machines == 1 and (multi.num_machines, multi.num_processes) == (2, 16)
    assert multi.main_process_ip and multi.main_process_port


def test_slurm_script_checkpoints_then_requeues(tmp_path):
    """The sbatch file under bash with stand-ins for srun and scontrol: SIGUSR1 (what --signal=B:USR1@120
    sends) reaches the training as SIGTERM, the script waits for it to exit, then requeues the job and
    exits non-zero."""
    script = os.path.join(ROOT, "scripts", "slurm_requeue.sbatch")
    text = open(script, encoding="utf-8").read()
    directives = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "--requeue" in directives and any(d.startswith("--signal=B:USR1@") for d in directives)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    # srun stands in for the training: it records its command, then on SIGTERM "checkpoints" and exits 143.
    (bin_dir / "srun").write_text(f"""#!/bin/bash
echo "srun $*" >> {log}
trap 'echo "training got SIGTERM" >> {log}; exit 143' TERM
echo started > {tmp_path}/started
while true; do sleep 0.1; done
""")
    (bin_dir / "scontrol").write_text(f"""#!/bin/bash
echo "scontrol $*" >> {log}
[ "$1" = show ] && echo node001
exit 0
""")
    for name in ("srun", "scontrol"):
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="node[001-002]", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_NAME="test")
    proc = subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=30)
    calls = log.read_text().splitlines()
    assert proc.returncode == 143, output
    assert calls[-2:] == ["training got SIGTERM", "scontrol requeue 4242"], calls
    srun = next(call for call in calls if call.startswith("srun "))
    assert "--nnodes 2" in srun and "node001:29500" in srun and "--output_dir" in srun


def test_readme_shows_the_multi_gpu_commands():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## Several GPUs or machines", 1)[1].split("\n## ", 1)[0]
    for needle in ("torchrun --nproc_per_node", "accelerate launch", "--deepspeed configs/deepspeed/zero2.json",
                   "--rdzv_endpoint", "configs/accelerate/multi_node.yaml", "scripts/slurm_requeue.sbatch"):
        assert needle in section, needle
    for path in ("configs/deepspeed/zero2.json", "configs/deepspeed/zero3.json", "configs/accelerate/multi_gpu.yaml",
                 "configs/accelerate/multi_node.yaml", "scripts/slurm_requeue.sbatch"):
        assert os.path.isfile(os.path.join(ROOT, path)), path
    for name in ("multi_gpu", "multi_node"):
        with open(os.path.join(ROOT, "configs", "accelerate", f"{name}.yaml"), encoding="utf-8") as f:
            assert yaml.safe_load(f)["distributed_type"] == "MULTI_GPU"


# --- The multi-process fixes in shared code, checked in-process (fast) ------------------------------------

def test_cpu_only_machine_turns_on_use_cpu(monkeypatch):
    """Without --use_cpu, accelerate forms no process group on a machine without GPUs (each rank would train
    alone and all would write the same files), and TrainingArguments refuses --bf16."""
    import arguments
    from transformers import TrainingArguments

    types = (arguments.ModelArguments, TrainingArguments)
    for accelerator in (False, True):
        monkeypatch.setattr(arguments, "_without_accelerator", lambda: not accelerator)
        training_args = arguments.parse_args(types, ["--output_dir=x"])[1]
        assert training_args.use_cpu is not accelerator


def test_plain_mean_losses_are_not_scaled_by_the_process_count(tmp_path):
    """transformers multiplies the loss of any model with **kwargs in forward by the number of processes,
    assuming it divided by the global token count; BERT's classification head (and T5) just take the mean."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, Trainer, TrainingArguments

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    classifier = Trainer(model=BertForSequenceClassification(config), args=args)
    assert classifier.model_accepts_loss_kwargs  # what transformers assumes
    train_utils.prepare_trainer(classifier, {})
    assert not classifier.model_accepts_loss_kwargs
    mlm = BertForMaskedLM(config)
    assert run_mlm.enable_sparse_mlm_head(mlm)  # divides by num_items_in_batch itself
    sparse = Trainer(model=mlm, args=args)
    train_utils.prepare_trainer(sparse, {})
    assert sparse.model_accepts_loss_kwargs


def test_stop_signal_echo_is_not_a_second_signal(monkeypatch):
    """Slurm signals every process of a step and torchrun forwards its copy: one request, two deliveries."""
    now = [100.0]
    monkeypatch.setattr(train_utils.time, "monotonic", lambda: now[0])
    exits = []
    monkeypatch.setattr(train_utils.os, "_exit", exits.append)
    callback = train_utils.PreemptionCallback()
    callback._handle(signal.SIGTERM, None)
    now[0] += 0.05
    callback._handle(signal.SIGTERM, None)
    assert callback.signal_number == signal.SIGTERM and exits == []
    now[0] += callback.REPEAT_WINDOW_SECONDS
    callback._handle(signal.SIGINT, None)  # a person pressing Ctrl-C again, later: exit now
    assert exits == [128 + signal.SIGINT]


def test_mfu_counts_every_process_and_zero3_shards():
    """Tokens are summed over all processes, so the peak is too; ZeRO-3 leaves a rank empty placeholders."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    callback = throughput.ThroughputCallback(flops_per_token=1e6, peak_flops=1e9)
    logs = {}
    for world_size in (1, 2):
        callback._last = (time.perf_counter() - 1.0, 0)
        state = SimpleNamespace(num_input_tokens_seen=1000, log_history=[], global_step=1)
        logs[world_size] = {"loss": 1.0}
        callback.on_log(SimpleNamespace(world_size=world_size), state, None, logs=logs[world_size])
    assert logs[2]["mfu"] == pytest.approx(logs[1]["mfu"] / 2, rel=0.05)

    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    whole = throughput.transformer_flops_per_token(model, 32)
    for param in model.parameters():  # what deepspeed.zero.Init leaves on each rank
        param.ds_numel = param.numel()
        param.data = torch.empty(0)
    assert throughput.transformer_flops_per_token(model, 32) == whole
