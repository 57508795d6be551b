"""``GAMTrainer``: ``transformers.Trainer`` whose training step runs the passes of GAM / SAM / GNP.

Overrides, and nothing else:

- ``training_step``: runs the mode's passes (:mod:`hf_gam.passes`) and leaves the step's direction in ``p.grad``, so
  the Trainer's clipping, optimizer, scheduler and logging work unchanged. Mode ``none`` and the steps skipped by
  ``gam_every`` are the stock ``Trainer.training_step``.
- ``compute_loss``: single-label classifiers get one cross-entropy, normalized by ``num_items_in_batch`` exactly as
  transformers' own loss does, for every model (EfficientNet's built-in loss ignores ``num_items_in_batch``).
- ``floating_point_ops``: counts the passes the mode runs.
- ``log``: adds the per-step figures (``gam/grad_norm``, ``gam/ascent_grad_norm``, ``gam/r1``).
- ``create_model_card``: the GAM card (:mod:`hf_gam.card`), when that module is available.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments

from .config import GAMConfig
from .directions import MODES
from .passes import MicroBatchOracle, WindowOracle, run_passes

__all__ = ["GAMTrainer"]


def _is_single_label_classifier(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (config is not None and getattr(config, "num_labels", 0) > 1
            and getattr(config, "problem_type", None) in (None, "single_label_classification"))


class GAMTrainer(Trainer):
    """A ``transformers.Trainer`` for sharpness- and flatness-aware training; pass ``args=GAMConfig(...)``.

    Everything else (datasets, collators, optimizers, callbacks, ``accelerate launch`` / ``torchrun``) is the
    Trainer's. See :class:`hf_gam.GAMConfig` for the ``gam_*`` fields and ``ALGORITHMS.md`` for the update rules.
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *a, **kw):
        if args is None:
            args = GAMConfig(output_dir="trainer_output")
        if not isinstance(args, GAMConfig):
            raise TypeError(f"GAMTrainer needs args=GAMConfig(...) (a TrainingArguments subclass with the gam_* "
                            f"fields); got {type(args).__name__}")
        super().__init__(model, args, *a, **kw)
        self._gam_metrics: dict[str, list[Tensor]] = defaultdict(list)
        self._gam_window: list[dict[str, Any]] = []
        self._gam_own_loss = _is_single_label_classifier(self.accelerator.unwrap_model(self.model))
        if self._gam_own_loss:
            self.model_accepts_loss_kwargs = True  # our compute_loss normalizes by num_items_in_batch itself

    # ----------------------------------------------------------------------------------------------- losses
    def _own_loss_applies(self, inputs: dict[str, Any]) -> bool:
        labels = inputs.get("labels")
        return (self._gam_own_loss and self.compute_loss_func is None and isinstance(labels, Tensor)
                and not labels.is_floating_point())

    def _logits_and_labels(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[Any, Tensor, Tensor]:
        labels = inputs["labels"]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return outputs, logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Cross-entropy of single-label classifiers computed here, the same for every model: ``sum / num_items``
        over the accumulation window (transformers' ``fixed_cross_entropy``), times the process count when
        ``average_tokens_across_devices`` (as ``Trainer.compute_loss``). Other models: the Trainer's own."""
        if not self._own_loss_applies(inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        outputs, logits, labels = self._logits_and_labels(model, inputs)
        smoothing = self.args.label_smoothing_factor
        if num_items_in_batch is None:
            loss = torch_F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=smoothing)
        else:
            loss = torch_F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum",
                                         label_smoothing=smoothing)
            loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                           else num_items_in_batch)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _mean_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """Mean loss of one micro-batch at the current weights (the ``L`` of ALGORITHMS.md)."""
        with self.compute_loss_context_manager():
            if self._own_loss_applies(inputs):
                _, logits, labels = self._logits_and_labels(model, inputs)
                return torch_F.cross_entropy(logits, labels, ignore_index=-100,
                                             label_smoothing=self.args.label_smoothing_factor)
            return self.compute_loss(model, inputs)

    @staticmethod
    def _num_items(inputs: dict[str, Any]) -> Tensor:
        labels = inputs.get("labels")
        if isinstance(labels, Tensor):
            return labels.ne(-100).sum() if not labels.is_floating_point() else torch.tensor(labels.shape[0])
        raise ValueError("GAMTrainer needs a `labels` tensor in every batch")

    def _micro_batch_weight(self, inputs: dict[str, Any], num_items_in_batch) -> Tensor:
        """Share of this micro-batch in the step's gradient, the same as the stock loss gives it:
        ``n_i / num_items_in_batch`` (times the process count when averaged across devices), else
        ``1 / accumulation steps``."""
        if num_items_in_batch is None or not self.model_accepts_loss_kwargs:
            return torch.tensor(1.0 / self.current_gradient_accumulation_steps, dtype=torch.float64)
        n_total = num_items_in_batch if torch.is_tensor(num_items_in_batch) else torch.tensor(num_items_in_batch)
        w = self._num_items(inputs).double().cpu() / n_total.double().cpu()
        if self.args.average_tokens_across_devices:
            w = w * self.accelerator.num_processes
        return w

    # ------------------------------------------------------------------------------------------ the step
    def gam_step_active(self) -> bool:
        """Whether the current optimizer step runs the mode's passes (``gam_every``)."""
        return self.args.gam_mode != "none" and self.state.global_step % self.args.gam_every == 0

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> Tensor:
        if not self.gam_step_active():
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.args.gam_perturbation == "global":
            return self._global_step(model, params, inputs)
        oracle = MicroBatchOracle(model, params, lambda: self._mean_loss(model, inputs),
                                  pass_context=lambda: self.accelerator.no_sync(model))
        d, stats = run_passes(self.args, params, oracle)
        weight = self._micro_batch_weight(inputs, num_items_in_batch)
        self._accumulate_grad(params, d, weight)
        if self.accelerator.sync_gradients and self.accelerator.num_processes > 1:
            _all_reduce_mean([p.grad for p in params])
        self._record(stats)
        return (stats["loss"].double() * weight).to(self.args.device, torch.float32)

    def _global_step(self, model: nn.Module, params: list[Tensor], inputs: dict[str, Any]) -> Tensor:
        """``gam_perturbation="global"``: keep the window's micro-batches; at its last one run every pass over all
        of them on all processes (:class:`~hf_gam.passes.WindowOracle`) and set ``p.grad`` to the direction."""
        self._gam_window.append(inputs)
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        window, self._gam_window = self._gam_window, []
        oracle = WindowOracle(model, params, window, lambda b: self._mean_loss(model, b), self._num_items,
                              pass_context=lambda: self.accelerator.no_sync(model))
        d, stats = run_passes(self.args, params, oracle)
        self._accumulate_grad(params, d, torch.tensor(1.0, dtype=torch.float64))
        self._record(stats)
        return stats["loss"].to(self.args.device, torch.float32)

    @staticmethod
    def _accumulate_grad(params: list[Tensor], d: list[Tensor], weight: Tensor) -> None:
        """``p.grad += weight * d`` (gradients of earlier micro-batches of the window are kept)."""
        with torch.no_grad():
            torch._foreach_mul_(d, weight.to(d[0].device, d[0].dtype))
            for p, di in zip(params, d):
                if p.grad is None:
                    p.grad = di.to(p.dtype)
                else:
                    p.grad.add_(di)

    def _record(self, stats: dict[str, Tensor]) -> None:
        self._gam_metrics["gam/grad_norm"].append(stats["grad_norm"].detach())
        if "ascent_grad_norm" in stats:
            self._gam_metrics["gam/ascent_grad_norm"].append(stats["ascent_grad_norm"].detach())
            if self.args.gam_mode in ("gam", "gam_sam", "gam_fast"):
                self._gam_metrics["gam/r1"].append(self.args.gam_rho * stats["ascent_grad_norm"].detach())

    # ------------------------------------------------------------------------------------ bookkeeping
    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's count of one forward+backward, times the passes of the mode on its active steps
        (an exact HVP counted as two passes)."""
        flos = super().floating_point_ops(inputs)
        return flos * MODES[self.args.gam_mode].passes if self.gam_step_active() else flos

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._gam_metrics and "loss" in logs:
            for key, values in self._gam_metrics.items():
                logs[key] = torch.stack([v.float().cpu() for v in values]).mean().item()
            self._gam_metrics.clear()
        super().log(logs, start_time)


def _all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average ``tensors`` over all processes in place with one collective (flattened buffer)."""
    import torch.distributed as dist

    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for t, r in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(r)
