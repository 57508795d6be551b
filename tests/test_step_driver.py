"""The shared step driver (hf_gam.core.step.apply_direction_step) as its callers use it: the custom accelerate loop
of examples/ under an fp16 GradScaler, and the hot path of accumulate_grads_."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
