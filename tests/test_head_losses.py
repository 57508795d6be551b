"""Multi-label (BCE) and regression (MSE) losses skip label elements set to -100, both in the summed head loss and in
GAMTrainer's step: the loss is the mean over the kept elements only, and the step is minus the gradient of that
mean. References are written independently here (BCE and squared error from their formulas, in float64, over the
kept elements picked by boolean indexing)."""

from __future__ import annotations

import pytest
import torch
from reference import flat_params
from testing_utils import TensorDataset, assert_rel, sgd_args, tiny_model

from hf_gam import GAMTrainer
from hf_gam.trainer.losses import summed_head_loss

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = {"multi_label_classification": {"problem_type": "multi_label_classification", "num_labels": 3},
         "regression": {"num_labels": 1}}


def labels_with_ignored(head: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Float labels of ``head`` for ``n`` rows, about a quarter of the elements set to -100 (at least one)."""
    if head == "regression":
        labels = torch.randn(n, generator=generator, dtype=torch.float64)
    else:
        labels = torch.randint(0, 2, (n, 3), generator=generator).double()
    ignored = torch.rand(labels.shape, generator=generator) < 0.25
    ignored.view(-1)[0] = True
    return torch.where(ignored, torch.full_like(labels, -100.0), labels)


def independent_summed_loss(head: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over the kept label elements of -[y log σ(z) + (1-y) log(1-σ(z))] (multi-label) or (z - y)² (regression)."""
    z, y = logits.reshape(-1), labels.reshape(-1)
    kept = y != -100
    z, y = z[kept], y[kept]
    if head == "regression":
        return ((z - y) ** 2).sum()
    return -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).sum()


@pytest.mark.parametrize("head", list(HEADS))
def test_summed_loss_excludes_ignored_elements(head):
    g = torch.Generator().manual_seed(3)
    labels = labels_with_ignored(head, 4 if head != "regression" else 12, g)
    logits = torch.randn(labels.shape if head != "regression" else (12, 1), generator=g, dtype=torch.float64)
    assert (labels == -100).sum() >= 1
    expected = independent_summed_loss(head, logits, labels)
    actual = summed_head_loss(head, logits, labels, smoothing=0.0)
    assert torch.allclose(actual, expected, rtol=1e-12, atol=0), (actual.item(), expected.item())


@pytest.mark.parametrize("mode", [dict(gam_mode="none"), dict(gam_mode="sam", sam_rho=0.0)])
@pytest.mark.parametrize("head", list(HEADS))
def test_step_is_gradient_of_mean_over_kept_elements(tmp_path, head, mode):
    """Accumulation 2 over uneven micro-batches (8 + 4), SGD lr 1: θ moves by minus the gradient of the mean loss
    over the kept label elements of all 12 rows."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    labels = labels_with_ignored(head, 12, g)
    model = tiny_model(0, **HEADS[head])
    theta0 = flat_params(model)

    reference = tiny_model(0, **HEADS[head])
    kept = (labels != -100).sum()
    mean = independent_summed_loss(head, reference(x).logits, labels) / kept
    expected_step = -torch.cat([p.reshape(-1) for p in torch.autograd.grad(mean, list(reference.parameters()))])

    args = sgd_args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2, **mode)
    GAMTrainer(model=model, args=args, train_dataset=TensorDataset(x, labels)).train()
    assert_rel(flat_params(model) - theta0, expected_step, tol=1e-10)
