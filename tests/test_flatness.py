"""Tests of the flatness measures (hf_gam.flatness.measures: Hessian spectrum and trace, R1/R0) and
hf_gam.flatness.landscape; the report, its arguments, the pictures and the callback are tested in
test_flatness_report.py.

Independent references: the explicit Hessian by ``torch.autograd.functional.hessian`` over a flat parameter vector
(``torch.func.functional_call``, own loss code), and quadratics whose Hessian and flatness are known in closed form.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn
from testing_utils import VIT_8PX, LogitsMLP, LossMLP, assert_unchanged, snapshot, tiny_vit, vit_batches
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_gam import flatness as FL
from hf_gam.flatness._objective import Objective
from hf_gam.flatness.landscape import filter_normalized_direction
from hf_gam.core.functional import second_order_context

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- models, helpers
class Quadratic(nn.Module):
    """``L(θ) = ½ (θ-θ*)ᵀ A (θ-θ*)`` with ``A = Q diag(eigs) Qᵀ``; ``θ = θ* + offset`` (at the minimum: 0)."""

    def __init__(self, eigs, offset=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = len(eigs)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
        self.register_buffer("A", q @ torch.diag(torch.tensor(eigs, dtype=DT)) @ q.T)
        self.register_buffer("center", torch.randn(n, generator=g, dtype=DT))
        self.theta = nn.Parameter(self.center.clone() + (0 if offset is None else offset))

    def forward(self, x, labels=None):
        d = self.theta - self.center
        return SequenceClassifierOutput(loss=0.5 * d @ self.A @ d + 0.0 * x.sum(), logits=x)


def mlp_batches(sizes=(32, 16), i=5, o=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(n, i, generator=g, dtype=DT), "labels": torch.randint(0, o, (n,), generator=g)}
            for n in sizes]


def quad_batches():
    return [{"x": torch.zeros(2, 1, dtype=DT), "labels": torch.zeros(2, dtype=torch.long)}]


def explicit_hessian(model, batches):
    """Dense Hessian of the example-weighted mean loss w.r.t. the trainable parameters (own loss code)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    total = sum(len(b["labels"]) for b in batches)

    def f(flat):
        state, i = {}, 0
        for n, p in named:
            state[n] = flat[i:i + p.numel()].view_as(p)
            i += p.numel()
        loss = 0.0
        for b in batches:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            out = torch.func.functional_call(model, state, kwargs=inputs)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            loss = loss + nn.functional.cross_entropy(logits, b["labels"]) * len(b["labels"]) / total
        return loss

    with second_order_context():
        return torch.autograd.functional.hessian(f, flat0)


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def mlp_case():
    model, batches = LogitsMLP(), mlp_batches()
    assert 150 <= sum(p.numel() for p in model.parameters()) <= 400
    return model, batches, torch.linalg.eigvalsh(explicit_hessian(model, batches))


# ------------------------------------------------------------------------------------------ Hessian eigenvalues
def test_lanczos_top_eigenvalues_match_explicit_hessian(mlp_case):
    model, batches, ev = mlp_case
    est = FL.hessian_eigenvalues(model, batches, k=5)
    ref = ev.flip(0)[:5].tolist()
    assert est == sorted(est, reverse=True)
    for e, r in zip(est, ref):
        assert rel(e, r) < 1e-2
    assert max(rel(e, r) for e, r in zip(est, ref)) < 1e-6  # what Lanczos actually reaches here


def test_power_iteration_matches_explicit_hessian(mlp_case):
    model, batches, ev = mlp_case
    est = FL.hessian_eigenvalues(model, batches, k=3, method="power", max_iter=300, tol=1e-8)
    ref = sorted(ev[ev.abs().argsort(descending=True)[:3]].tolist(), reverse=True)
    for e, r in zip(est, ref):
        assert rel(e, r) < 1e-2


def test_loss_output_and_logits_give_the_same_numbers():
    a, b = LogitsMLP(seed=3), LossMLP(seed=3)
    batches = mlp_batches()
    assert FL.hessian_eigenvalues(a, batches, k=2) == pytest.approx(FL.hessian_eigenvalues(b, batches, k=2),
                                                                  rel=1e-10)
    assert FL.hessian_trace(a, batches, 20) == pytest.approx(FL.hessian_trace(b, batches, 20), rel=1e-10)


def test_repeated_eigenvalues_are_found_with_multiplicity():
    model = Quadratic([3.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    assert FL.hessian_eigenvalues(model, quad_batches(), k=4) == pytest.approx([3.0, 3.0, 2.0, 1.0], rel=1e-8)


def test_attention_model_matches_explicit_hessian():
    """Exact HVPs through ViT's SDPA attention (math kernel); only q/k/v trainable (requires_grad honoured)."""
    model, batches = tiny_vit(**VIT_8PX, dtype=DT), vit_batches()
    for n, p in model.named_parameters():
        p.requires_grad_(any(s in n for s in ("q_proj", "k_proj", "v_proj")))
    assert model.config._attn_implementation == "sdpa"
    assert 100 <= sum(p.numel() for p in model.parameters() if p.requires_grad) <= 400
    h = explicit_hessian(model, batches)
    snap = snapshot(model)
    est = FL.hessian_eigenvalues(model, batches, k=2)
    for e, r in zip(est, torch.linalg.eigvalsh(h).flip(0)[:2].tolist()):
        assert rel(e, r) < 1e-2
    assert FL.hessian_trace(model, batches, 200) == pytest.approx(h.trace().item(), rel=0.3)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("train_mode", [False, True])
def test_batchnorm_eval_statistics_by_default(train_mode):
    model = LogitsMLP(bn=True)
    batches = mlp_batches()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.train()
    snap = snapshot(model)
    est = FL.hessian_eigenvalues(model, batches, k=1, train_mode=train_mode)
    assert_unchanged(model, snap)
    model.train(train_mode)
    h = explicit_hessian(model, batches)  # eval mode: running stats; train mode: batch statistics
    for b, s in zip(model.buffers(), snap["buffers"]):
        b.copy_(s)
    model.train()
    assert rel(est[0], torch.linalg.eigvalsh(h)[-1].item()) < 1e-2


# ------------------------------------------------------------------------------------------------ Hessian trace
def test_hutchinson_trace_within_5_percent_at_3000_samples():
    # 41 parameters; its Hessian's off-diagonal mass puts the estimator's standard error near 0.9%: 5% is ~5 sigma
    model, batches = LogitsMLP(6, 3, 5, seed=4), mlp_batches((64,), i=6, o=5, seed=5)
    ref = explicit_hessian(model, batches).trace().item()
    est, stderr = FL.hessian_trace(model, batches, num_samples=3000, return_stderr=True)
    assert rel(est, ref) < 0.05
    assert abs(est - ref) < 5 * stderr


def test_trace_gaussian_probes_and_exactness_on_a_diagonal_hessian():
    model = Quadratic([5.0, 2.0, 1.0, 0.25])
    model.A = torch.diag(torch.diagonal(model.A))  # diagonal Hessian: every Rademacher probe is exact
    assert FL.hessian_trace(model, quad_batches(), 1) == pytest.approx(model.A.trace().item(), rel=1e-12)
    est = FL.hessian_trace(model, quad_batches(), 2000, distribution="gaussian")
    assert est == pytest.approx(model.A.trace().item(), rel=0.1)


# ------------------------------------------------------------------------------ first- and zeroth-order flatness
@pytest.mark.parametrize("rho", [0.05, 0.5])
@pytest.mark.parametrize("step_size", [None, 0.5])
def test_lemma_4_1_on_a_quadratic_at_its_minimum(rho, step_size):
    eigs = [4.0, 2.0, 1.5, 1.0, 0.5, 0.2, 0.1, 0.0]
    model, batches = Quadratic(eigs), quad_batches()
    steps = 10 if step_size is None else 30
    r1 = FL.first_order_flatness(model, batches, rho, num_steps=steps, step_size=step_size)
    r0 = FL.zeroth_order_flatness(model, batches, rho, num_steps=steps, step_size=step_size)
    assert r1 == pytest.approx(rho ** 2 * 4.0, rel=0.02)  # R1 = ρ² λmax
    assert r0 == pytest.approx(rho ** 2 * 4.0 / 2, rel=0.02)  # R0 = ρ² λmax / 2
    assert r1 <= rho ** 2 * 4.0 * (1 + 1e-9) and r0 <= rho ** 2 * 2.0 * (1 + 1e-9)  # lower bounds of the maxima
    assert r0 <= r1
    assert r1 / rho ** 2 == pytest.approx(FL.hessian_eigenvalues(model, batches)[0], rel=0.02)


def test_proposition_4_2_r0_below_r1():
    cases = [(LogitsMLP(seed=s), mlp_batches(seed=s)) for s in range(2)]
    cases.append((Quadratic([3.0, -1.0, 0.5], offset=torch.tensor([0.3, -0.2, 0.1], dtype=DT)), quad_batches()))
    for model, batches in cases:
        for rho in (0.01, 0.1, 1.0):
            r0 = FL.zeroth_order_flatness(model, batches, rho, num_steps=3)
            r1 = FL.first_order_flatness(model, batches, rho, num_steps=3)
            assert 0.0 <= r0 <= r1
    assert FL.first_order_flatness(model, batches, 0.0) == 0.0 == FL.zeroth_order_flatness(model, batches, 0.0)


# ---------------------------------------------------------------------------------------------- loss landscape
def test_loss_landscape_1d_and_2d():
    model, batches = LogitsMLP(), mlp_batches()
    one = FL.loss_landscape(model, batches, dim=1, resolution=5)
    two = FL.loss_landscape(model, batches, dim=2, resolution=5, span=0.5)
    assert len(one["losses"]) == 5 and len(two["losses"]) == 5 and all(len(r) == 5 for r in two["losses"])
    centre = Objective(model, batches, None).loss()
    assert one["losses"][2] == pytest.approx(centre, rel=1e-12) == two["losses"][2][2]
    assert one["center_loss"] == pytest.approx(centre, rel=1e-12)
    assert len(set(one["losses"])) == 5  # the directions move the loss
    assert FL.loss_landscape(model, batches, dim=1, resolution=5) == one  # deterministic
    assert FL.loss_landscape(model, batches, dim=1, resolution=5, seed=1)["losses"] != one["losses"]


def test_filter_normalized_directions():
    model = LogitsMLP()
    obj = Objective(model, mlp_batches(), None)
    d = filter_normalized_direction(obj, torch.Generator().manual_seed(0), ignore_1d=True)
    for di, p in zip(d, obj.params):
        if p.ndim == 1:
            assert torch.count_nonzero(di) == 0
        else:
            torch.testing.assert_close(di.norm(dim=1), p.detach().norm(dim=1))


# ------------------------------------------------------------------------- invariants, determinism, bad input
def test_every_function_leaves_the_model_unchanged_and_is_deterministic():
    model = LogitsMLP(bn=True, dropout=0.2)
    model.fc1.bias.requires_grad_(False)
    model.fc2.weight.grad = torch.ones_like(model.fc2.weight)
    batches = mlp_batches()
    model(batches[0]["x"])  # non-trivial BN statistics
    model.train()
    calls = [lambda **kw: FL.hessian_eigenvalues(model, batches, k=2, **kw),
             lambda **kw: FL.hessian_trace(model, batches, 5, **kw),
             lambda **kw: FL.first_order_flatness(model, batches, 0.1, num_steps=2, **kw),
             lambda **kw: FL.zeroth_order_flatness(model, batches, 0.1, num_steps=2, **kw),
             lambda **kw: FL.loss_landscape(model, batches, resolution=3, **kw)]
    for call in calls:
        for train_mode in (False, True):
            snap = snapshot(model)
            first = call(train_mode=train_mode)
            assert_unchanged(model, snap)
            assert call(train_mode=train_mode) == first  # deterministic, dropout included
    assert FL.hessian_trace(model, batches, 5, seed=1) != FL.hessian_trace(model, batches, 5, seed=0)
    model.eval()
    snap = snapshot(model)
    FL.hessian_eigenvalues(model, batches)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("call, match", [
    (lambda m, b: FL.hessian_eigenvalues(m, b, k=0), r"k must be .*got 0"),
    (lambda m, b: FL.hessian_eigenvalues(m, b, k=3, max_iter=2), r"max_iter must be .*got 2"),
    (lambda m, b: FL.hessian_eigenvalues(m, b, method="qr"), r"method must be .*got 'qr'"),
    (lambda m, b: FL.hessian_trace(m, b, num_samples=0), r"num_samples must be .*got 0"),
    (lambda m, b: FL.first_order_flatness(m, b, rho=-0.1), r"rho must be .*got -0.1"),
    (lambda m, b: FL.zeroth_order_flatness(m, b, rho=-1), r"rho must be .*got -1"),
    (lambda m, b: FL.first_order_flatness(m, b, 0.1, num_steps=0), r"num_steps must be .*got 0"),
    (lambda m, b: FL.loss_landscape(m, b, dim=3), r"dim must be .*got 3"),
    (lambda m, b: FL.hessian_trace(m, [], 3), r"batches must .*got 0"),
    (lambda m, b: FL.first_order_flatness(m, iter([]), 0.1), r"batches must .*got 0"),
])
def test_bad_arguments_raise_value_error(call, match):
    model = LogitsMLP()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        call(model, mlp_batches())
    assert_unchanged(model, snap)
