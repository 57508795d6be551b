"""`torch_compile=True` with GAMTrainer: the compiled run equals the eager one (first-order modes compiled, the
exact-HVP modes' passes on the uncompiled module), and accelerate's regional compilation, which leaves no uncompiled
module, is refused for the exact-HVP modes."""

from __future__ import annotations

import pytest
import torch
from testing_utils import image_data, tiny_conv, train_tiny_conv

from hf_gam import GAMConfig, GAMTrainer


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
    eager, _ = train_tiny_conv(tmp_path / "e", mode, torch.channels_last)
    compiled, trainer = train_tiny_conv(tmp_path / "c", mode, torch.channels_last, torch_compile=True,
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
