"""`p.grad` is written in the parameter's memory format, by GAMTrainer and by the optimizer wrapper.

transformers 5's default optimizer, `adamw_torch_fused`, reads `p.grad` as if it had `p`'s strides. With
channels-last inputs `torch.autograd.grad` returns conv-weight gradients in channels-last layout while the weights
are contiguous: a direction assigned as is would update the wrong elements (autograd's own accumulation, used by
`.backward()`, copies into the parameter's layout, so the plain Trainer is right). Channels-last and contiguous
inputs must give the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from testing_utils import image_data, tiny_conv, train_tiny_conv

from hf_gam.optim import GAM


@pytest.mark.parametrize("mode", ["none", "sam", "gam_fast", "gam"])
def test_channels_last_inputs_fused_adamw_equal_contiguous(tmp_path, mode):
    contiguous, _ = train_tiny_conv(tmp_path / "c", mode)
    channels_last, _ = train_tiny_conv(tmp_path / "cl", mode, torch.channels_last)
    assert any(p.dim() == 4 for p in contiguous)
    for a, b in zip(contiguous, channels_last):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-8)  # adam: ~4e-10 from summation order alone


def wrapper_steps(mode, memory_format=torch.contiguous_format):
    """Three steps of hf_gam.optim.GAM around fused AdamW on :func:`tiny_conv`, inputs in ``memory_format``."""
    model = tiny_conv()
    data = image_data(16, size=6, dtype=torch.float64)
    x = data.x.contiguous(memory_format=memory_format)
    opt = GAM(model.parameters(), torch.optim.AdamW(model.parameters(), lr=0.05, fused=True), mode=mode, model=model)
    for step in range(3):
        rows = slice(8 * (step % 2), 8 * (step % 2) + 8)
        opt.step(lambda: F.cross_entropy(model(x[rows]).logits, data.y[rows]))
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["none", "sam", "gam_fast", "gam"])
def test_optimizer_wrapper_channels_last_inputs_fused_adamw_equal_contiguous(mode):
    contiguous, channels_last = wrapper_steps(mode), wrapper_steps(mode, torch.channels_last)
    assert any(p.dim() == 4 for p in contiguous)
    for a, b in zip(contiguous, channels_last):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-8)
