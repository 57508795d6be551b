"""The shared step driver (hf_gam.core.step.apply_direction_step) as its callers use it: the custom accelerate loop
of examples/ under an fp16 GradScaler, and the hot path of accumulate_grads_."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from testing_utils import tiny_data, tiny_model

from hf_gam.core.directions import GAMHyper

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_accelerate_loop_step_under_fp16_grad_scaler_is_the_plain_step():
    """accelerate's fp16 (a GradScaler, GPU only: forced here on the CPU) unscales p.grad in the prepared optimizer's
    step: the example's step must put S·d there, or every update is S times too small. ``none`` mode: the step is
    θ - lr·g, as plain SGD on the same batch."""
    from accelerate import Accelerator

    example = load_example("custom_accelerate_loop")
    data = tiny_data(n=8)
    reference = tiny_model()
    F.cross_entropy(reference(data.x).logits, data.y).backward()
    expected = [p.detach() - 0.5 * p.grad for p in reference.parameters()]

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # what fp16 on a GPU makes
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    stats = example.train_step(accelerator, model, params, optimizer, GAMHyper.for_mode("none"),
                               lambda: F.cross_entropy(model(data.x).logits, data.y))
    assert torch.isfinite(stats["loss"])
    for got, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


class OpCounter:
    """Counts the aten ops run inside (a TorchDispatchMode: every kernel call, whichever module issues it)."""

    def __enter__(self):
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[func.overloadpacket.__name__] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_accumulate_grads_with_weight_one_runs_no_parameter_sized_multiply():
    """GAM.step and the global-perturbation Trainer step pass weight 1: d becomes p.grad as it is (no
    ``_foreach_mul_`` over every parameter, a full read and write of the gradients per step); other weights scale."""
    from hf_gam.core.step import accumulate_grads_

    params = [torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64)) for _ in range(2)]
    d = [torch.randn(3, 2, dtype=torch.float64) for _ in range(2)]
    expected = [x.clone() for x in d]
    with OpCounter() as ops:
        accumulate_grads_(params, d, 1.0, [True, True])
    assert ops.counts["_foreach_mul_"] == 0, dict(ops.counts)
    assert all(p.grad is x for p, x in zip(params, d))  # the direction itself, no copy
    assert all(torch.equal(p.grad, e) for p, e in zip(params, expected))
    accumulate_grads_(params, [x.clone() for x in expected], 0.5, [True, False])
    torch.testing.assert_close(params[0].grad, 1.5 * expected[0], rtol=0, atol=0)
    assert torch.equal(params[1].grad, expected[1])


def test_plain_direction_takes_one_norm():
    """Mode ``none`` (and GAM.step's steps skipped by ``every``): ‖d‖ = ‖g‖, so the finiteness check of run_passes
    reuses the norm instead of taking it again (under FSDP2 each norm is a collective)."""
    from hf_gam.core.oracles import MicroBatchOracle
    from hf_gam.core.step import run_passes

    model, data = tiny_model(), tiny_data(n=8)
    params = list(model.parameters())
    oracle = MicroBatchOracle(model, params, lambda: F.cross_entropy(model(data.x).logits, data.y))
    with OpCounter() as ops:
        d, stats = run_passes(GAMHyper.for_mode("none"), params, oracle)
    assert ops.counts["_foreach_norm"] == 1, dict(ops.counts)
    torch.testing.assert_close(stats["grad_norm"], torch.linalg.vector_norm(torch.cat([x.reshape(-1) for x in d])))


class FirstParameterUnused(torch.nn.Module):
    """Its first parameter is one the loss never reaches (a mask token, an unused head): p.grad stays None."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mask_token = torch.nn.Parameter(torch.zeros(4))
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x)


def test_fp16_overflow_skips_the_step_when_the_first_parameter_is_unreached():
    """An overflow must reach the GradScaler through a parameter that gets a gradient: otherwise the scaler sees
    finite (zero) gradients, steps (momentum and weight decay move the weights) and never lowers the scale."""
    from hf_gam.optim import GAM

    model, data = FirstParameterUnused(), tiny_data(n=8, dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = GAM(model.parameters(), torch.optim.SGD, lr=1.0, momentum=0.9, weight_decay=0.1, mode="sam", rho=0.1,
              grad_scaler=scaler)
    theta0 = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(data.x), data.y)
        return loss * float("inf") if len(calls) == 2 else loss  # the perturbed pass overflows

    loss = opt.step(closure)
    assert opt.last_stats.get("overflow") is not None
    # the step returns the clean pass's (finite) loss, as the plain step would, not NaN
    assert loss.item() == pytest.approx(F.cross_entropy(model(data.x), data.y).item(), rel=1e-6)
    assert scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta0))
    assert not opt.base_optimizer.state
