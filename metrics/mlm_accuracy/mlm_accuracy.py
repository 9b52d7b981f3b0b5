"""Masked-token accuracy as a local `evaluate` module.

Load it from the repository so it works offline:

    evaluate.load("/abs/path/to/metrics/mlm_accuracy")

Callers pass flattened predicted token ids and the collator's labels unchanged; positions labelled
-100 (tokens that were not masked, padding) are dropped here, so every script does not have to
repeat the masking logic.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Accuracy of predicted token ids over the positions that carry a label, i.e. the masked positions of a
masked-language-modelling batch. Positions whose reference is the ignore index (-100 by default, the
value Hugging Face collators and loss functions use) are excluded.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted token ids, flattened to one id per position (e.g. logits.argmax(-1).reshape(-1)).
    references: label token ids, flattened the same way; -100 marks positions to ignore.
    ignore_index: label value to exclude (default -100).
Returns:
    {"accuracy": float} -- correct / counted over positions whose reference != ignore_index.
    If no position is left after ignoring, accuracy is nan (not 0.0), so "nothing was masked" is not
    confused with "every prediction was wrong".
Example:
    >>> mlm_acc = evaluate.load("metrics/mlm_accuracy")
    >>> mlm_acc.compute(predictions=[5, 7, 9, 2], references=[5, -100, 1, -100])
    {'accuracy': 0.5}
"""

IGNORE_INDEX = -100


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MlmAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            format="numpy",
        )

    def _compute(self, predictions, references, ignore_index=IGNORE_INDEX):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        keep = references != ignore_index
        counted = int(keep.sum())
        if counted == 0:
            return {"accuracy": float("nan")}
        correct = int((predictions[keep] == references[keep]).sum())
        return {"accuracy": correct / counted}
