"""Check GAMTrainer's fp16 (GradScaler) path on a CUDA machine.

    python examples/check_fp16_cuda.py

For `sam`, `gam_fast` and `gam`: one SGD step (lr 1) under `fp16=True` must match the float32 step within fp16
round-off (norms use unscaled gradients, the final gradient stays scaled for the Trainer's unscale); then an
injected `inf` in a perturbed pass must skip the whole step (weights unchanged, scale halved, scheduler not
stepped). Exits 0 with a message when no CUDA device exists (fp16 autocast is refused on CPU by accelerate; the CPU
test suite covers the same logic with a real `torch.amp.GradScaler` in tests/test_robustness.py).
"""

from __future__ import annotations

import sys
import tempfile

import torch

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.testing import TensorDataset, TinyMLP, TinyMLPConfig


def data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 4, (n,), generator=g))


class Overflow(GAMTrainer):
    def _mean_loss(self, model, inputs):
        self.calls = getattr(self, "calls", 0) + 1
        loss = super()._mean_loss(model, inputs)
        return loss * float("inf") if self.calls == 2 else loss


def step(mode: str, fp16: bool, cls=GAMTrainer):
    torch.manual_seed(0)
    model = TinyMLP(TinyMLPConfig(in_dim=32, hidden=64, num_labels=4))
    args = GAMConfig(output_dir=tempfile.mkdtemp(), fp16=fp16, gam_mode=mode, max_steps=1, learning_rate=1.0,
                     optim="sgd", lr_scheduler_type="linear", max_grad_norm=0.0, per_device_train_batch_size=64,
                     report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = cls(model=model, args=args, train_dataset=data())
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    return trainer, before, [p.detach().clone() for p in model.parameters()]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (tests/test_robustness.py covers the logic on CPU)")
        return 0
    ok = True
    for mode in ("sam", "gam_fast", "gam"):
        _, b32, a32 = step(mode, fp16=False)
        _, b16, a16 = step(mode, fp16=True)
        d32 = torch.cat([(b - a).flatten() for b, a in zip(b32, a32)])
        d16 = torch.cat([(b - a).flatten() for b, a in zip(b16, a16)])
        rel = ((d16 - d32).norm() / d32.norm()).item()
        good = rel < 2e-2
        ok &= good
        print(f"{mode:9s} fp16 vs fp32 step: relative difference {rel:.2e} {'ok' if good else 'FAIL'}")
    trainer, before, after = step("gam_fast", fp16=True, cls=Overflow)
    skipped = all(torch.equal(b, a) for b, a in zip(before, after))
    scaler = trainer.accelerator.scaler
    good = skipped and trainer.accelerator.optimizer_step_was_skipped and trainer.lr_scheduler.last_epoch == 0
    ok &= good
    print(f"overflow in a perturbed pass: step skipped={skipped}, scale now {scaler.get_scale():g} "
          f"{'ok' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
