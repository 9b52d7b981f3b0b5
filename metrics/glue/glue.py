"""GLUE benchmark metrics as a local `evaluate` module.

Load it from the repository instead of the Hub so evaluation works offline:

    evaluate.load("/abs/path/to/metrics/glue", "mrpc")

Result keys match the Hugging Face GLUE metric and what run_glue reports, so downstream code
(metric_for_best_model, result tables) does not have to change.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_DESCRIPTION = """\
Metrics for the GLUE benchmark (and HANS): Matthews correlation for CoLA, Pearson and Spearman
correlation for STS-B, accuracy and binary F1 for MRPC and QQP, accuracy for every other task.
"""

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels, one per example. Integer class ids, except for "stsb" where they
        are float similarity scores.
    references: gold labels, same length and type as predictions.
Returns (keys depend on the config name):
    cola: {"matthews_correlation"}
    stsb: {"pearson", "spearmanr"}
    mrpc, qqp: {"accuracy", "f1"}  (f1 is binary F1 with label 1 as the positive class)
    sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans: {"accuracy"}
All values are Python floats.
Example:
    >>> glue = evaluate.load("metrics/glue", "mrpc")
    >>> glue.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'f1': 0.6666666666666666}
"""

_ACCURACY_ONLY = ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans")
_ACCURACY_AND_F1 = ("mrpc", "qqp")
VALID_CONFIG_NAMES = ("cola", "stsb", *_ACCURACY_AND_F1, *_ACCURACY_ONLY)


class UnknownGlueConfigError(KeyError, ValueError):
    """Raised for a config name that is not a GLUE task.

    A KeyError, like the Hub GLUE metric raises, so existing handlers still catch it; also a
    ValueError because that is what a bad argument usually is. str() is overridden because
    KeyError would otherwise show the message as a quoted repr.
    """

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _accuracy(predictions, references):
    return float(accuracy_score(references, predictions))


def _accuracy_and_f1(predictions, references):
    # Default zero_division and pos_label=1 are kept on purpose: they are what the Hub GLUE metric
    # uses, so numbers stay comparable with published run_glue results.
    return {
        "accuracy": _accuracy(predictions, references),
        "f1": float(f1_score(references, predictions)),
    }


def _pearson_and_spearman(predictions, references):
    predictions = np.asarray(predictions, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    # Constant predictions give nan (scipy warns); that is reported rather than hidden, because a
    # regressor that outputs a constant is a real failure worth seeing in the logs.
    return {
        "pearson": float(pearsonr(predictions, references)[0]),
        "spearmanr": float(spearmanr(predictions, references)[0]),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    def _info(self):
        # Validate here rather than in _compute so a typo fails at load time, before any evaluation.
        if self.config_name not in VALID_CONFIG_NAMES:
            # evaluate substitutes "default" when no config name was given.
            problem = (
                "The GLUE metric needs a config name"
                if self.config_name == "default"
                else f"Unknown GLUE config name {self.config_name!r}"
            )
            raise UnknownGlueConfigError(
                f"{problem}. Valid names: {', '.join(VALID_CONFIG_NAMES)} "
                '(e.g. evaluate.load(".../metrics/glue", "mrpc")).'
            )
        # STS-B is kept in float64, unlike the Hub metric's float32, so scores are not rounded before
        # the correlations. The "numpy" output format would cast floats back to float32 (datasets'
        # NumpyFormatter default), so STS-B is read back as Python floats instead.
        is_regression = self.config_name == "stsb"
        dtype = "float64" if is_regression else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}
            ),
            homepage="https://gluebenchmark.com/",
            reference_urls=["https://arxiv.org/abs/1804.07461"],
            format=None if is_regression else "numpy",
        )

    def _compute(self, predictions, references):
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.config_name == "stsb":
            return _pearson_and_spearman(predictions, references)
        if self.config_name in _ACCURACY_AND_F1:
            return _accuracy_and_f1(predictions, references)
        return {"accuracy": _accuracy(predictions, references)}
