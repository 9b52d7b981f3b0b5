"""Tests for the local evaluate modules in metrics/glue and metrics/mlm_accuracy.

Expected values come straight from scikit-learn / SciPy / numpy so the modules are checked against the
libraries the Hub GLUE metric is built on, not against themselves.
"""

import json
import math
import os
import subprocess
import sys
import warnings

import evaluate
import numpy as np
import pytest
from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE_PATH = os.path.join(REPO_ROOT, "metrics", "glue")
MLM_ACCURACY_PATH = os.path.join(REPO_ROOT, "metrics", "mlm_accuracy")

# Number of classes per task; the label space only matters for generating realistic inputs.
CLASSIFICATION_TASKS = {
    "cola": 2,
    "sst2": 2,
    "mrpc": 2,
    "qqp": 2,
    "mnli": 3,
    "mnli_matched": 3,
    "mnli_mismatched": 3,
    "qnli": 2,
    "rte": 2,
    "wnli": 2,
    "hans": 2,
}
ALL_CONFIGS = [*CLASSIFICATION_TASKS, "stsb"]
EXPECTED_KEYS = {
    "cola": {"matthews_correlation"},
    "stsb": {"pearson", "spearmanr"},
    "mrpc": {"accuracy", "f1"},
    "qqp": {"accuracy", "f1"},
}
SEEDS = [0, 1, 2]
SIZES = [2, 17, 256, 1000]
TOL = 1e-9

# Degenerate inputs are tested on purpose; the library warnings they trigger are expected noise.
pytestmark = [
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning"),
    pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning"),
    pytest.mark.filterwarnings("ignore:A single label was found:UserWarning"),
]


@pytest.fixture(scope="module")
def metric_cache_dir(tmp_path_factory):
    # Keeps the arrow files of file-backed runs out of the user's HF cache.
    return str(tmp_path_factory.mktemp("evaluate_metric_cache"))


def load_glue(config_name, cache_dir, keep_in_memory=True):
    return evaluate.load(GLUE_PATH, config_name, cache_dir=cache_dir, keep_in_memory=keep_in_memory)


def load_mlm_accuracy(cache_dir, keep_in_memory=True):
    return evaluate.load(MLM_ACCURACY_PATH, cache_dir=cache_dir, keep_in_memory=keep_in_memory)


def expected_glue(config_name, predictions, references):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", ConstantInputWarning)
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        if config_name == "cola":
            return {"matthews_correlation": matthews_corrcoef(references, predictions)}
        if config_name == "stsb":
            return {
                "pearson": pearsonr(predictions, references)[0],
                "spearmanr": spearmanr(predictions, references)[0],
            }
        result = {"accuracy": accuracy_score(references, predictions)}
        if config_name in ("mrpc", "qqp"):
            result["f1"] = f1_score(references, predictions)
        return result


def assert_results_close(actual, expected):
    assert set(actual) == set(expected)
    for key, value in actual.items():
        assert type(value) is float, f"{key} is {type(value).__name__}, expected a Python float"
        if math.isnan(expected[key]):
            assert math.isnan(value), f"{key}: expected nan, got {value}"
        else:
            assert math.isclose(value, float(expected[key]), rel_tol=0.0, abs_tol=TOL), (key, value, expected[key])


def random_inputs(config_name, seed, size):
    rng = np.random.default_rng(seed)
    if config_name == "stsb":
        references = rng.uniform(0.0, 5.0, size)
        # Correlated with the references so the correlations are not all near zero.
        predictions = references + rng.normal(0.0, 1.0 + seed, size)
        return predictions, references
    num_labels = CLASSIFICATION_TASKS[config_name]
    references = rng.integers(0, num_labels, size)
    flip = rng.random(size) < 0.3 + 0.1 * seed
    predictions = np.where(flip, rng.integers(0, num_labels, size), references)
    return predictions, references


@pytest.mark.parametrize("config_name", ALL_CONFIGS)
def test_result_keys(config_name, metric_cache_dir):
    predictions, references = random_inputs(config_name, seed=0, size=20)
    result = load_glue(config_name, metric_cache_dir).compute(predictions=predictions, references=references)
    assert set(result) == EXPECTED_KEYS.get(config_name, {"accuracy"})


@pytest.mark.parametrize("config_name", ALL_CONFIGS)
def test_glue_matches_reference_libraries(config_name, metric_cache_dir):
    metric = load_glue(config_name, metric_cache_dir)
    for seed in SEEDS:
        for size in SIZES:
            predictions, references = random_inputs(config_name, seed, size)
            # Lists as well as arrays, since scripts pass either.
            for preds, refs in ((predictions, references), (predictions.tolist(), references.tolist())):
                result = metric.compute(predictions=preds, references=refs)
                assert_results_close(result, expected_glue(config_name, predictions, references))


def test_glue_known_values(metric_cache_dir):
    predictions, references = [0, 1, 1], [0, 1, 0]
    assert load_glue("cola", metric_cache_dir).compute(predictions=predictions, references=references) == {
        "matthews_correlation": 0.5
    }
    assert load_glue("mrpc", metric_cache_dir).compute(predictions=predictions, references=references) == {
        "accuracy": 2 / 3,
        "f1": 2 / 3,
    }
    result = load_glue("stsb", metric_cache_dir).compute(predictions=[1.0, 2.0, 3.0], references=[2.0, 4.0, 6.5])
    assert result["spearmanr"] == pytest.approx(1.0, abs=TOL)
    assert result["pearson"] == pytest.approx(0.9979487157886733, abs=TOL)


# (predictions, references) pairs that hit zero denominators or perfect scores.
DEGENERATE_CLASSIFICATION = {
    "constant_predictions": ([1] * 10, [0, 1] * 5),
    "constant_zero_predictions": ([0] * 10, [0, 1] * 5),
    "constant_everything": ([0] * 10, [0] * 10),
    "perfect": ([0, 1, 1, 0, 1], [0, 1, 1, 0, 1]),
    "inverted": ([1, 0, 0, 1, 0], [0, 1, 1, 0, 1]),
    "single_example": ([1], [1]),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE_CLASSIFICATION))
@pytest.mark.parametrize("config_name", ["cola", "mrpc", "qqp", "sst2", "rte"])
def test_glue_degenerate_classification(config_name, case, metric_cache_dir):
    predictions, references = DEGENERATE_CLASSIFICATION[case]
    result = load_glue(config_name, metric_cache_dir).compute(predictions=predictions, references=references)
    assert_results_close(result, expected_glue(config_name, np.array(predictions), np.array(references)))


def test_cola_degenerate_values(metric_cache_dir):
    cola = load_glue("cola", metric_cache_dir)
    # Constant predictions have no correlation to speak of; sklearn defines that as 0, not nan.
    predictions, references = DEGENERATE_CLASSIFICATION["constant_predictions"]
    assert cola.compute(predictions=predictions, references=references) == {"matthews_correlation": 0.0}
    assert cola.compute(predictions=[0, 1, 1, 0], references=[0, 1, 1, 0])["matthews_correlation"] == 1.0
    assert cola.compute(predictions=[1, 0, 0, 1], references=[0, 1, 1, 0])["matthews_correlation"] == -1.0


DEGENERATE_REGRESSION = {
    "constant_predictions": ([2.5] * 8, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.5, 2.5]),
    "perfect": ([0.0, 1.0, 2.0, 5.0], [0.0, 1.0, 2.0, 5.0]),
    "perfect_negative": ([5.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 5.0]),
    "ties": ([1.0, 1.0, 2.0, 2.0, 3.0], [0.5, 1.5, 1.5, 4.0, 4.0]),
    "two_examples": ([0.2, 0.9], [1.0, 3.0]),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE_REGRESSION))
def test_stsb_degenerate(case, metric_cache_dir):
    predictions, references = DEGENERATE_REGRESSION[case]
    result = load_glue("stsb", metric_cache_dir).compute(predictions=predictions, references=references)
    assert_results_close(result, expected_glue("stsb", np.array(predictions), np.array(references)))


def test_stsb_constant_predictions_give_nan(metric_cache_dir):
    predictions, references = DEGENERATE_REGRESSION["constant_predictions"]
    result = load_glue("stsb", metric_cache_dir).compute(predictions=predictions, references=references)
    assert math.isnan(result["pearson"]) and math.isnan(result["spearmanr"])


def test_stsb_keeps_float64_precision(metric_cache_dir):
    # Differences below float32 resolution must survive storage, or the correlation changes.
    references = np.array([1.0, 1.0 + 1e-9, 1.0 + 3e-9, 1.0 + 2e-9])
    predictions = np.array([3.0, 3.0 + 2e-9, 3.0 + 5e-9, 3.0 + 1e-9])
    result = load_glue("stsb", metric_cache_dir).compute(predictions=predictions, references=references)
    assert_results_close(result, expected_glue("stsb", predictions, references))


@pytest.mark.parametrize("keep_in_memory", [True, False], ids=["in_memory", "file_backed"])
@pytest.mark.parametrize("config_name", ["cola", "stsb", "mrpc", "mnli"])
def test_glue_add_batch(config_name, keep_in_memory, metric_cache_dir):
    predictions, references = random_inputs(config_name, seed=3, size=301)
    metric = load_glue(config_name, metric_cache_dir, keep_in_memory=keep_in_memory)
    # Uneven batch sizes, as with a last partial evaluation batch.
    bounds = [0, 64, 128, 130, 250, 301]
    for start, end in zip(bounds[:-1], bounds[1:]):
        metric.add_batch(predictions=predictions[start:end], references=references[start:end])
    result = metric.compute()
    assert_results_close(result, expected_glue(config_name, predictions, references))
    # The metric must be reusable after compute() (the trainer calls it every evaluation).
    again = metric.compute(predictions=predictions[:50], references=references[:50])
    assert_results_close(again, expected_glue(config_name, predictions[:50], references[:50]))


@pytest.mark.parametrize("config_name", ["bogus", "MRPC", "mnli-mm", "sts-b"])
def test_glue_unknown_config(config_name, metric_cache_dir):
    with pytest.raises(KeyError) as excinfo:
        load_glue(config_name, metric_cache_dir)
    message = str(excinfo.value)
    assert repr(config_name) in message
    for valid in ALL_CONFIGS:
        assert valid in message
    # Also a ValueError, so either kind of handler catches a bad name.
    assert isinstance(excinfo.value, ValueError)


def test_glue_missing_config(metric_cache_dir):
    with pytest.raises(KeyError, match="needs a config name"):
        evaluate.load(GLUE_PATH, cache_dir=metric_cache_dir, keep_in_memory=True)


def random_mlm_batch(rng, shape, vocab_size=50, mask_rate=0.15):
    labels = rng.integers(0, vocab_size, shape)
    labels = np.where(rng.random(shape) < mask_rate, labels, -100)
    # Predictions are right about half the time on labelled positions, arbitrary elsewhere.
    predictions = np.where(rng.random(shape) < 0.5, labels, rng.integers(0, vocab_size, shape))
    predictions = np.where(labels == -100, rng.integers(0, vocab_size, shape), predictions)
    return predictions, labels


def numpy_masked_accuracy(predictions, labels, ignore_index=-100):
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    keep = labels != ignore_index
    return float(np.mean(predictions[keep] == labels[keep]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 40), (8, 16), (32, 128)])
def test_mlm_accuracy_matches_numpy(seed, shape, metric_cache_dir):
    rng = np.random.default_rng(seed)
    predictions, labels = random_mlm_batch(rng, shape)
    if not (labels != -100).any():
        labels[0, 0] = predictions[0, 0]
    result = load_mlm_accuracy(metric_cache_dir).compute(
        predictions=predictions.reshape(-1), references=labels.reshape(-1)
    )
    assert set(result) == {"accuracy"}
    assert type(result["accuracy"]) is float
    assert math.isclose(result["accuracy"], numpy_masked_accuracy(predictions, labels), abs_tol=TOL)


def test_mlm_accuracy_ignores_unlabelled_positions(metric_cache_dir):
    metric = load_mlm_accuracy(metric_cache_dir)
    labels = [5, -100, 1, -100, 9]
    assert metric.compute(predictions=[5, 7, 9, 2, 9], references=labels) == {"accuracy": 2 / 3}
    # Changing predictions where the label is -100 must not change the score.
    assert metric.compute(predictions=[5, -100, 9, 0, 9], references=labels) == {"accuracy": 2 / 3}


def test_mlm_accuracy_nothing_left_is_nan(metric_cache_dir):
    metric = load_mlm_accuracy(metric_cache_dir)
    assert math.isnan(metric.compute(predictions=[1, 2, 3], references=[-100, -100, -100])["accuracy"])
    assert math.isnan(metric.compute(predictions=[], references=[])["accuracy"])


def test_mlm_accuracy_custom_ignore_index(metric_cache_dir):
    predictions, labels = [1, 2, 3, 4], [1, 0, 3, 0]
    result = load_mlm_accuracy(metric_cache_dir).compute(predictions=predictions, references=labels, ignore_index=0)
    assert result == {"accuracy": 1.0}


@pytest.mark.parametrize("keep_in_memory", [True, False], ids=["in_memory", "file_backed"])
def test_mlm_accuracy_add_batch(keep_in_memory, metric_cache_dir):
    rng = np.random.default_rng(7)
    metric = load_mlm_accuracy(metric_cache_dir, keep_in_memory=keep_in_memory)
    all_predictions, all_labels = [], []
    # Different sequence lengths per batch, as with dynamic padding.
    for batch_size, seq_len in [(8, 32), (8, 64), (3, 17)]:
        predictions, labels = random_mlm_batch(rng, (batch_size, seq_len))
        metric.add_batch(predictions=predictions.reshape(-1), references=labels.reshape(-1))
        all_predictions.append(predictions.reshape(-1))
        all_labels.append(labels.reshape(-1))
    expected = numpy_masked_accuracy(np.concatenate(all_predictions), np.concatenate(all_labels))
    assert math.isclose(metric.compute()["accuracy"], expected, abs_tol=TOL)


def test_mlm_accuracy_accepts_torch_tensors(metric_cache_dir):
    torch = pytest.importorskip("torch")
    predictions = torch.tensor([[5, 7], [9, 2]])
    labels = torch.tensor([[5, -100], [1, -100]])
    result = load_mlm_accuracy(metric_cache_dir).compute(
        predictions=predictions.reshape(-1), references=labels.reshape(-1)
    )
    assert result == {"accuracy": 0.5}


# Runs in a fresh interpreter because evaluate reads its cache locations and offline flags at import time.
# Outbound IP connections are made to fail, so a passing run proves nothing is fetched.
_OFFLINE_LOAD_SCRIPT = r"""
import json, os, socket, sys, time

attempts = []
_real_connect = socket.socket.connect

def _no_network(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        attempts.append(repr(address))
        raise OSError("network disabled by test_metrics.py")
    return _real_connect(self, address)

socket.socket.connect = _no_network

start = time.perf_counter()
import evaluate
import_s = time.perf_counter() - start

glue_path, mlm_path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
cola = evaluate.load(glue_path, "cola")
glue_load_s = time.perf_counter() - start
start = time.perf_counter()
mlm = evaluate.load(mlm_path)
mlm_load_s = time.perf_counter() - start

print(json.dumps({
    "cola": cola.compute(predictions=[0, 1, 1], references=[0, 1, 0]),
    "mlm": mlm.compute(predictions=[5, 7, 9, 2], references=[5, -100, 1, -100]),
    "network_attempts": attempts,
    "import_s": import_s,
    "glue_load_s": glue_load_s,
    "mlm_load_s": mlm_load_s,
}))
"""


def test_load_offline_with_fresh_cache(tmp_path):
    hf_home = tmp_path / "hf_home"
    env = {
        key: value
        for key, value in os.environ.items()
        # Anything pointing at an existing cache would make the "fresh cache" claim untrue.
        if not (key.startswith("HF_") or key in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME"))
    }
    env.update(
        HF_HOME=str(hf_home),
        HF_EVALUATE_CACHE=str(hf_home / "evaluate"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
    )
    completed = subprocess.run(
        [sys.executable, "-c", _OFFLINE_LOAD_SCRIPT, GLUE_PATH, MLM_ACCURACY_PATH],
        cwd=tmp_path,  # not the repo, so only the absolute paths can resolve the modules
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["network_attempts"] == []
    assert report["cola"] == {"matthews_correlation": 0.5}
    assert report["mlm"] == {"accuracy": 0.5}

    created = {p.relative_to(hf_home).as_posix() for p in hf_home.rglob("*")}
    # The module code is copied into the fresh cache, proving that cache (not a pre-existing one) was used.
    assert any(p.startswith("modules/evaluate_modules/metrics/glue/") and p.endswith("/glue.py") for p in created)
    assert any(p.endswith("/mlm_accuracy.py") for p in created)
    assert not any(p.startswith(("hub", "evaluate/downloads")) for p in created), sorted(created)
    print(
        f"evaluate import {report['import_s']:.2f}s, glue load {report['glue_load_s']:.3f}s, "
        f"mlm_accuracy load {report['mlm_load_s']:.3f}s"
    )
