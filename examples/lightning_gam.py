"""GAM / SAM in PyTorch Lightning with :class:`hf_gam.optim.GAM`, automatic or manual optimization.

Automatic optimization: Lightning builds a closure (``training_step`` + ``zero_grad`` + ``backward``) and passes it to
``optimizer.step``; the wrapper calls it once per pass and reads the gradients from ``p.grad``. The exact-HVP modes
(``gam``, ``gam_sam``, ``gnp``) need the graph of the gradient, so :meth:`GAMModule.backward` asks for
``create_graph=True`` when the optimizer needs it. Manual optimization (``--manual``): ``training_step`` calls
``opt.step(closure)`` with a closure that returns the loss with its graph (no backward).

Clip with ``GAM(max_grad_norm=...)``, not ``Trainer(gradient_clip_val=...)`` (Lightning would clip each pass's
gradient, not the final direction). fp16 ``precision="16-mixed"`` does not take closures; use ``"bf16-mixed"``.
``accumulate_grad_batches`` > 1 is refused (Lightning runs the closure outside ``optimizer.step`` there). Tested on
one CPU process; multi-device strategies are not covered by the tests.

    python examples/lightning_gam.py --mode gam_fast --epochs 5            # sklearn digits, a small MLP, CPU
    python examples/lightning_gam.py --mode gam --manual --precision bf16-mixed
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from hf_gam.optim import GAM


def logits_of(output):
    """Plain modules return logits; Hugging Face models an output with ``.logits``."""
    return output.logits if hasattr(output, "logits") else output


class GAMModule(L.LightningModule):
    """Cross-entropy classification of ``(x, y)`` batches with ``model`` and a GAM-wrapped SGD.

    ``gam`` holds :class:`~hf_gam.optim.GAM`'s keyword arguments (``rho``, ``alpha``, ``every``, ...)."""

    def __init__(self, model: nn.Module, mode: str = "gam_fast", lr: float = 0.1, momentum: float = 0.9,
                 manual: bool = False, epochs: int = 1, **gam):
        super().__init__()
        self.model, self.mode, self.lr, self.momentum, self.epochs, self.gam = model, mode, lr, momentum, epochs, gam
        self.automatic_optimization = not manual

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(logits_of(self.model(x)), y)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            loss = self.loss(batch)  # Lightning's closure: this, zero_grad, backward; called once per pass
        else:
            opt = self.optimizers()
            loss = opt.step(closure=lambda: self.loss(batch))  # returns the clean pass's loss
            opt.zero_grad()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self):
        if not self.automatic_optimization:
            self.lr_schedulers().step()  # automatic optimization: Lightning steps it (once per epoch)

    def backward(self, loss, *args, **kwargs):
        """Automatic optimization: exact-HVP modes need ``create_graph=True`` (the wrapper clears ``p.grad``)."""
        kwargs.setdefault("create_graph", self.optimizers(use_pl_optimizer=False).needs_graph)
        loss.backward(*args, **kwargs)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = logits_of(self.model(x))
        self.log_dict({"val_loss": F.cross_entropy(logits, y), "val_accuracy": (logits.argmax(-1) == y).float().mean()})

    def configure_optimizers(self):
        if self.trainer.accumulate_grad_batches > 1:  # Lightning would call the closure outside optimizer.step
            raise ValueError("accumulate_grad_batches > 1 does not work with GAM's closure (the wrapper replaces "
                             "p.grad each pass); use a larger batch, or accumulate inside a manual-optimization "
                             f"closure; got {self.trainer.accumulate_grad_batches}")
        opt = GAM(self.parameters(), torch.optim.SGD, mode=self.mode, model=self.model, lr=self.lr,
                  momentum=self.momentum, **self.gam)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


def digits_loaders(batch_size: int = 64):
    """sklearn's 8x8 digits (shipped with scikit-learn, no download), hf_gam's stratified 80/20 split."""
    from hf_gam.data import load_digits_split

    def ds(x, y):
        return torch.utils.data.TensorDataset(torch.tensor(x.reshape(len(x), -1), dtype=torch.float32), torch.tensor(y))

    x_tr, y_tr, x_te, y_te = load_digits_split()
    g = torch.Generator().manual_seed(0)
    return (torch.utils.data.DataLoader(ds(x_tr, y_tr), batch_size=batch_size, shuffle=True, generator=g),
            torch.utils.data.DataLoader(ds(x_te, y_te), batch_size=256))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="gam_fast")
    p.add_argument("--manual", action="store_true", help="manual optimization (else automatic)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    args = p.parse_args(argv)
    L.seed_everything(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    module = GAMModule(model, mode=args.mode, lr=args.lr, manual=args.manual, epochs=args.epochs)
    train, val = digits_loaders()
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", precision=args.precision, logger=False,
                        enable_checkpointing=False)
    trainer.fit(module, train, val)
    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})


if __name__ == "__main__":
    main()
