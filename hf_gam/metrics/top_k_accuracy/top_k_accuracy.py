"""Top-k accuracy as an ``evaluate`` metric module, shipped with hf_gam so that it loads offline from its path
(``evaluate.load(hf_gam.metrics.metric_path("top_k_accuracy"))``): class scores (logits or probabilities) and
reference class ids -> ``{"top{k}_accuracy": ...}`` (``k=5`` by default; with fewer classes than ``k`` every
prediction counts as correct, as top-k over all classes)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Top-k accuracy: the fraction of examples whose reference class is among the k highest scores."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one score per class and example (logits or probabilities).
    references (`list` of `int`): reference class ids.
    k (`int`, defaults to 5): how many of the highest-scoring classes count.
    sample_weight (`list` of `float`, *optional*): weight of each example.
Returns:
    top{k}_accuracy (`float`): in [0, 1].
Examples:
    >>> top_k = evaluate.load("hf_gam/metrics/top_k_accuracy")
    >>> top_k.compute(predictions=[[0.1, 0.5, 0.4], [0.7, 0.1, 0.2]], references=[2, 1], k=2)
    {'top2_accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, k=5, sample_weight=None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1; got {k!r}")
        scores, refs = np.asarray(predictions, dtype=np.float64), np.asarray(references)
        kk = min(k, scores.shape[-1])
        top = np.argpartition(-scores, kth=kk - 1, axis=-1)[:, :kk]
        hit = (top == refs[:, None]).any(-1).astype(np.float64)
        weights = np.ones_like(hit) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        return {f"top{k}_accuracy": float((hit * weights).sum() / weights.sum())}
