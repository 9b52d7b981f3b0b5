"""Benchmark: fine_tune_glue.py's default padding (each batch padded to its longest example, batches grouped
by length) against padding every example to 128 tokens (--pad_to_max_length --max_seq_length 128, what HF's
run_glue.py does by default).

    python benchmarks/glue_padding.py            # MiniLM-L6 on SST-2: 8000 examples, 1 epoch, batch 32, lr 5e-5
    python benchmarks/glue_padding.py --quick    # 640 examples, 256 for eval: a smoke test

Both runs are the same but for padding (model, data, seed 42, schedule, full SST-2 dev set, 128-token
truncation) and run one after the other in this process. Reported: training time (the Trainer's
train_runtime), dev accuracy, evaluation time, and the speed-up. Needs ../shared
(models/minilm-l6-h384-uncased, data/glue/SST-2). Other code can call `run(quick=False)`.
"""

import argparse
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
MODEL = os.path.join(SHARED, "models", "minilm-l6-h384-uncased")
SST2 = os.path.join(SHARED, "data", "glue", "SST-2")

import fine_tune_glue  # noqa: E402

VARIANTS = {
    "default (per batch)": [],
    "pad to 128 (run_glue)": ["--pad_to_max_length", "--max_seq_length=128"],
}


def run(quick=False, model=MODEL, data_dir=SST2, seed=42):
    """Train and evaluate both variants; returns {variant: metrics} plus 'speedup' and 'accuracy_delta'."""
    for path in (model, data_dir):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: this benchmark needs the shared MiniLM and GLUE files")
    common = [
        f"--model_name_or_path={model}", "--task_name=sst2", f"--data_dir={data_dir}", "--do_train", "--do_eval",
        f"--max_train_samples={640 if quick else 8000}", "--num_train_epochs=1", "--per_device_train_batch_size=32",
        "--per_device_eval_batch_size=64", "--learning_rate=5e-5", f"--seed={seed}", "--save_strategy=no",
        "--report_to=none", "--disable_tqdm=True", "--logging_steps=50",
    ] + (["--max_eval_samples=256"] if quick else [])
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, extra in VARIANTS.items():
            metrics = fine_tune_glue.main(common + extra + [f"--output_dir={os.path.join(scratch, str(len(results)))}"])
            results[name] = {key: metrics[key] for key in ("train_runtime", "eval_accuracy", "eval_runtime",
                                                           "train_samples", "eval_samples")}
    default, padded = (results[name] for name in VARIANTS)
    results["speedup"] = padded["train_runtime"] / default["train_runtime"]
    results["accuracy_delta"] = default["eval_accuracy"] - padded["eval_accuracy"]
    return results


def print_table(results):
    print(f"\n{'padding':<24}{'train s':>10}{'dev accuracy':>14}{'eval s':>9}")
    for name in VARIANTS:
        r = results[name]
        print(f"{name:<24}{r['train_runtime']:>10.1f}{r['eval_accuracy']:>14.4f}{r['eval_runtime']:>9.1f}")
    first = results[next(iter(VARIANTS))]
    print(f"\nSST-2, {first['train_samples']} training / {first['eval_samples']} dev examples. Default padding trains "
          f"{results['speedup']:.2f}x faster; accuracy {100 * results['accuracy_delta']:+.2f} points.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="640 training and 256 dev examples")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--data_dir", default=SST2)
    args = parser.parse_args()
    print_table(run(args.quick, args.model, args.data_dir))


if __name__ == "__main__":
    main()
