"""Top-1 accuracy as an ``evaluate`` metric module, shipped with hf_gam so that it loads offline from its path
(``evaluate.load(hf_gam.metrics.metric_path("accuracy"))``). Same inputs and output as the Hub's ``accuracy``:
predicted class ids and reference class ids -> ``{"accuracy": ...}``."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Accuracy: the fraction of predictions equal to their reference, (TP + TN) / N for a classifier."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): reference class ids.
    normalize (`bool`, defaults to `True`): the fraction of correct predictions; `False`: their number.
    sample_weight (`list` of `float`, *optional*): weight of each example.
Returns:
    accuracy (`float`): in [0, 1] (or the count of correct predictions with `normalize=False`).
Examples:
    >>> accuracy = evaluate.load("hf_gam/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
