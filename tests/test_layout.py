"""`p.grad` in the parameter's layout (issue 10 item 2) and `torch_compile=True` (item 4).

transformers 5's default optimizer, `adamw_torch_fused`, reads `p.grad` as if it had `p`'s strides. With
channels-last inputs `torch.autograd.grad` returns conv-weight gradients in channels-last layout while the weights
are contiguous: a direction assigned as is would update the wrong elements (autograd's own accumulation, used by
`.backward()`, copies into the parameter's layout, so the plain Trainer is right)."""

from __future__ import annotations

import pytest
import torch
from testing_utils import image_data, tiny_conv

from hf_gam import GAMConfig, GAMTrainer


def collator(memory_format):
    def collate(features):
        x = torch.stack([f["pixel_values"] for f in features]).contiguous(memory_format=memory_format)
        return {"pixel_values": x, "labels": torch.stack([f["labels"] for f in features])}
    return collate


def run(tmp_path, mode, memory_format=torch.contiguous_format, dtype=torch.float64, **kw):
    model = tiny_conv(dtype=dtype)
    args = GAMConfig(output_dir=str(tmp_path), gam_mode=mode, optim="adamw_torch_fused", learning_rate=0.05,
                     per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=3, report_to="none",
                     use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0, **kw)
    trainer = GAMTrainer(model=model, args=args, train_dataset=image_data(32, size=6, dtype=dtype),
                         data_collator=collator(memory_format))
    trainer.train()
    return [p.detach().clone() for p in model.parameters()], trainer


@pytest.mark.parametrize("mode", ["none", "sam", "gam_fast", "gam"])
def test_channels_last_inputs_fused_adamw_equal_contiguous(tmp_path, mode):
    contiguous, _ = run(tmp_path / "c", mode)
    channels_last, _ = run(tmp_path / "cl", mode, torch.channels_last)
    assert any(p.dim() == 4 for p in contiguous)
    for a, b in zip(contiguous, channels_last):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-8)  # adam: ~4e-10 from summation order alone


# torch_compile=True: the compiled run equals the eager one. aot_eager (aot_autograd without inductor: seconds on
# CPU) is what has no double backward; inductor also returns gradients in other layouts than the parameters'
# (0.196 off after 3 fused-AdamW steps without the layout fix, measured), at ~10-100 s a run on CPU.
COMPILED = [
    ("inductor", "sam"),  # the one compiled test of the default run: compiled layout + fused AdamW
    pytest.param("inductor", "gam_fast", marks=pytest.mark.slow),
    pytest.param("inductor", "gam", marks=pytest.mark.slow),
    ("aot_eager", "gam_fast"),
    ("aot_eager", "gam"),  # exact HVP passes: on the uncompiled module (model._orig_mod)
    ("aot_eager", "gnp"),
]


@pytest.mark.parametrize("backend,mode", COMPILED)
def test_torch_compile_equals_eager(tmp_path, backend, mode):
    eager, _ = run(tmp_path / "e", mode, torch.channels_last)
    compiled, trainer = run(tmp_path / "c", mode, torch.channels_last, torch_compile=True,
                            torch_compile_backend=backend)
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"  # it really ran compiled
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-8)
    assert "gam/grad_norm" in trainer.state.log_history[0]


def test_regional_compilation_refused_for_exact_modes(tmp_path, monkeypatch):
    """accelerate's regional compilation compiles blocks in place: no uncompiled module is left for the HVP passes."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "1")

    def make(mode):
        args = GAMConfig(output_dir=str(tmp_path), gam_mode=mode, torch_compile=True, use_cpu=True, report_to="none")
        return GAMTrainer(model=tiny_conv(), args=args, train_dataset=image_data(16, size=6, dtype=torch.float64))

    with pytest.raises(ValueError, match=r"torch_compile.*gam_mode='gam'.*gam_fast"):
        make("gam")
    assert make("gam_fast").accelerator.state.dynamo_plugin.use_regional_compilation
