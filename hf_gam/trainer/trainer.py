"""``GAMTrainer``: ``transformers.Trainer`` whose training step runs the passes of GAM / SAM / GNP.

Overrides, and nothing else:

- ``training_step``: runs the mode's passes (:func:`hf_gam.core.step.apply_direction_step`) and leaves the step's
  direction in ``p.grad``, so the Trainer's clipping, optimizer, scheduler and logging work unchanged. Mode ``none`` and the steps skipped by
  ``gam_every`` are the stock ``Trainer.training_step``.
- ``compute_loss``: classification and regression heads (single-label cross-entropy, multi-label BCE, regression MSE,
  ignore index -100) get one loss, ``Σ loss / num_items_in_batch`` over the label elements the Trainer counts, for
  every model (EfficientNet's cross-entropy and every model's BCE / MSE ignore ``num_items_in_batch``).
- ``__init__``: plain ``TrainingArguments`` become a ``GAMConfig`` with the ``gam_*`` defaults (another subclass, a
  TRL config, becomes ``gam_config_class(that class)``, its values and defaults kept). What the ``Trainer`` subclass
  mixed in needs (TRL's: per-call metrics from the clean pass only, DPO's reference log-probabilities once per
  micro-batch, refusals, its own card) comes from its integration (:mod:`hf_gam.trainer.integrations`).
- ``floating_point_ops``: counts the passes the mode runs.
- ``log``: adds the per-step figures (``gam/grad_norm``, ``gam/ascent_grad_norm``, ``gam/r1``).
- ``create_model_card``: the GAM card (:mod:`hf_gam.trainer.card`), when that module is available.
- ``push_to_hub``, ``_push_from_checkpoint``: a push is retried once after a transient failure, and a failed
  background push (``hub_strategy``) is logged and raised at the final push (:mod:`hf_gam.trainer.hub`).
- From :class:`~hf_gam.trainer.durable.DurableTrainerMixin` (interrupted runs, docs/reliability.md): ``train`` (resume
  from the newest complete checkpoint), ``_save_checkpoint`` (commit marker after every process, rotation after it),
  ``_save``, ``save_metrics``, ``save_state`` (atomic files), and the SIGTERM stop all processes agree on;
  ``_load_from_checkpoint``, ``_load_best_model`` (checkpoint weights restored strictly through the model's key
  conversion, :mod:`hf_gam.trainer.checkpoints`); ``_save_optimizer_and_scheduler``,
  ``_load_optimizer_and_scheduler`` (also write and read ``gam_state.json``, the fallback and overflow counters,
  next to the optimizer state, atomically).

What is converted or refused at construction lives in :mod:`hf_gam.trainer.guards`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.utils import logging

from ..atomic import atomic_save
from .durable import DurableTrainerMixin
from .guards import (enabled_fsdp_version, refuse_data_parallel, refuse_regional_compilation,
                     refuse_sharded_engines, uncompiled)
from .hub import BackgroundPushes, final_push
from ..core.directions import MODES
from .integrations import integration_for
from .losses import classifier_config, fits_head, problem_type, summed_head_loss
from ..core.collectives import all_reduce_, world_size
from ..core.oracles import MicroBatchOracle, WindowOracle
from ..core.step import apply_direction_step, loss_scale_of

__all__ = ["GAMTrainer"]

logger = logging.get_logger(__name__)
LOGGED = ("gam/grad_norm", "gam/ascent_grad_norm", "gam/r1")  # figures logged as means over processes


class GAMTrainer(DurableTrainerMixin, Trainer):
    """A ``transformers.Trainer`` for sharpness- and flatness-aware training; pass ``args=GAMConfig(...)`` (plain
    ``TrainingArguments`` are converted, with the ``gam_*`` defaults: ``gam_mode="gam_fast"``).

    Everything else (datasets, collators, optimizers, callbacks, ``accelerate launch`` / ``torchrun``) is the
    Trainer's. See :class:`hf_gam.GAMConfig` for the ``gam_*`` fields and ``docs/algorithms.md`` for the update rules.
    """

    def __init__(self, *a, **kw):
        """The arguments of the Trainer class mixed in (``transformers.Trainer``'s: ``model``, ``args``, ...; TRL's
        ``DPOTrainer``'s: ``model``, ``ref_model``, ``args``, ...), positional or by name."""
        bound = inspect.signature(super().__init__).bind_partial(*a, **kw)
        self.gam_integration = integration_for(type(self))  # what the Trainer subclass mixed in needs (TRL's)
        args = bound.arguments["args"] = self.gam_integration.gam_args(bound.arguments.get("args"),
                                                                       bound.arguments.get("model"))
        self.gam_integration.refuse(args)
        refuse_sharded_engines(args, deepspeed=bool(args.deepspeed), fsdp_version=None)
        super().__init__(*bound.args, **bound.kwargs)
        refuse_sharded_engines(args, deepspeed=self.is_deepspeed_enabled, fsdp_version=enabled_fsdp_version(self))
        refuse_regional_compilation(args, getattr(self.accelerator.state, "dynamo_plugin", None))
        refuse_data_parallel(args)
        self._hub_pushes = BackgroundPushes()
        self.gam_spec = MODES[args.gam_mode]  # the mode's registry entry, looked up once
        self.gam_counters = {"nonfinite_fallbacks": 0, "overflow_steps": 0}
        self._gam_sums: Tensor | None = None  # [Σ, count] of each LOGGED figure since the last log
        self._gam_rho_used: float | None = None
        self._gam_window: list[dict[str, Any]] = []
        self._gam_evaluated: list[dict[str, Any]] = []  # micro-batches whose loss this step has evaluated
        self._gam_head = classifier_config(self.accelerator.unwrap_model(self.model))
        if self.compute_loss_func is not None or not self.gam_integration.own_head_loss:
            self._gam_head = None  # the user's loss is the loss
        self._stock_accepts_loss_kwargs = self.model_accepts_loss_kwargs
        if self._gam_head is not None:
            # our compute_loss normalizes by num_items_in_batch itself; the Trainer must count it for every model
            self.model_accepts_loss_kwargs = True

    # ----------------------------------------------------------------------------------------------- losses
    def _own_loss_applies(self, inputs: dict[str, Any]) -> bool:
        labels = inputs.get("labels")
        return self._gam_head is not None and isinstance(labels, Tensor) and fits_head(self._gam_head, labels)

    def _summed_loss(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[Any, Tensor, Tensor]:
        """``(outputs, Σ loss over the counted label elements, their count)`` of one micro-batch."""
        labels = inputs["labels"]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        total = summed_head_loss(problem_type(self._gam_head, labels), logits, labels,
                                  self.args.label_smoothing_factor)
        return outputs, total, self._num_items(inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss of classification and regression heads computed here, the same for every model and head:
        ``Σ loss / num_items_in_batch`` over the accumulation window (transformers' ``fixed_cross_entropy`` rule,
        extended to multi-label BCE and regression MSE), times the process count when
        ``average_tokens_across_devices`` (as ``Trainer.compute_loss``). Other models: the Trainer's own."""
        if not self._own_loss_applies(inputs):
            forced, self.model_accepts_loss_kwargs = self.model_accepts_loss_kwargs, self._stock_accepts_loss_kwargs
            try:  # the stock loss, with the stock decision on passing num_items_in_batch to forward
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            finally:
                self.model_accepts_loss_kwargs = forced
        outputs, total, n_items = self._summed_loss(model, inputs)
        if num_items_in_batch is None:
            loss = total / n_items.to(total.device).clamp_min(1)
        else:
            loss = total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch)
                            else num_items_in_batch)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _mean_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """Mean loss of one micro-batch at the current weights (the ``L`` of docs/algorithms.md): the loss summed
        over its counted label elements divided by their count ``n_i`` (:meth:`_num_items`)."""
        clean = not any(b is inputs for b in self._gam_evaluated)  # its first evaluation in this step
        if clean:
            self._gam_evaluated.append(inputs)
        with self.compute_loss_context_manager(), self.gam_integration.pass_context(self, inputs, clean):
            if self._own_loss_applies(inputs):
                _, total, n_items = self._summed_loss(model, inputs)
                return total / n_items.to(total.device).clamp_min(1)
            return self.compute_loss(model, dict(inputs))  # a copy: Trainer.compute_loss pops "labels"

    def _num_items(self, inputs: dict[str, Any]) -> Tensor:
        """What the Trainer's ``num_items_in_batch`` counts for this micro-batch: label elements that are not
        ``-100`` (rows for single-label and 1-output regression heads, rows x classes for multi-label ones; a causal
        LM's shifted targets ``labels[..., 1:]``, or ``shift_labels``, by the Trainer's own rule)."""
        n_items = self.gam_integration.num_items(self, inputs)
        if n_items is not None:
            return n_items
        labels = inputs.get("shift_labels", inputs.get("labels"))
        if isinstance(labels, Tensor):
            if "shift_labels" not in inputs and getattr(self, "_loss_shifts_labels", False):
                labels = labels[..., 1:]
            return labels.ne(-100).sum()
        raise ValueError("GAMTrainer needs a `labels` tensor in every batch")

    def _micro_batch_weight(self, inputs: dict[str, Any], num_items_in_batch) -> Tensor:
        """Share of this micro-batch in the step's gradient, the same as the stock loss gives it:
        ``n_i / num_items_in_batch`` (times the process count when averaged across devices) where the Trainer
        normalizes by ``num_items_in_batch`` (a model taking loss kwargs, or any ``compute_loss_func``, whatever the
        model's forward takes), else ``1 / accumulation steps``."""
        if num_items_in_batch is None or not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            return torch.tensor(1.0 / self.current_gradient_accumulation_steps, dtype=torch.float64)
        n_i = self._num_items(inputs)  # on the batch's device: no host sync
        dtype = torch.float32 if n_i.device.type == "mps" else torch.float64
        w = n_i.to(dtype) / torch.as_tensor(num_items_in_batch, device=n_i.device).to(dtype)
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
        inputs = self.gam_integration.prepare_micro_batch(self, self._prepare_inputs(inputs))
        self._gam_evaluated = []
        if self.gam_spec.hvp:
            model = uncompiled(model)  # aot_autograd has no double backward; parameters are shared
        params = [p for p in model.parameters() if p.requires_grad]
        if self.args.gam_perturbation == "global":
            return self._global_perturbation_step(model, params, inputs)
        oracle = MicroBatchOracle(model, params, lambda: self._mean_loss(model, inputs), loss_scale=self._loss_scale(),
                                  pass_context=self._pass_context(model))
        hyper = self._hyper()
        weight = self._micro_batch_weight(inputs, num_items_in_batch)
        stats = apply_direction_step(hyper, params, oracle, weight=weight,
                                     average_over_processes=self.accelerator.sync_gradients)
        self._record(stats, hyper)
        return (stats["loss"].double() * weight).to(self.args.device, torch.float32)

    def _global_perturbation_step(self, model: nn.Module, params: list[Tensor], inputs: dict[str, Any]) -> Tensor:
        """``gam_perturbation="global"``: keep the window's micro-batches; at its last one run every pass over all
        of them on all processes (:class:`~hf_gam.core.oracles.WindowOracle`) and set ``p.grad`` to the direction."""
        self._gam_window.append(inputs)
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        window, self._gam_window = self._gam_window, []
        oracle = WindowOracle(model, params, window, lambda b: self._mean_loss(model, b), self._num_items,
                              loss_scale=self._loss_scale(), pass_context=self._pass_context(model))
        hyper = self._hyper()
        stats = apply_direction_step(hyper, params, oracle)
        self._record(stats, hyper)
        return stats["loss"].to(self.args.device, torch.float32)

    def _pass_context(self, model: nn.Module):
        """What wraps every pass: DDP's ``no_sync`` (the oracle reduces what must be global); nothing under FSDP2,
        whose ``no_sync`` would skip the reduce-scatter every pass needs (the gradients the oracle reads)."""
        if getattr(self.accelerator, "is_fsdp2", False):
            return contextlib.nullcontext
        return lambda: self.accelerator.no_sync(model)

    def _hyper(self):
        """This step's hyper-parameters (radii follow the learning rate under ``lr_proportional``)."""
        if self.args.gam_rho_schedule == "constant" or self.lr_scheduler is None:
            return self.args.gam_hyper()
        # the peak is the optimizer's own initial lr (set by the scheduler): it differs from args.learning_rate
        # when optimizer_cls_and_kwargs or a ready optimizer sets another one
        peak = self.optimizer.param_groups[0].get("initial_lr", self.args.learning_rate)
        return self.args.gam_hyper(self._get_learning_rate(), peak_lr=float(peak))

    def _loss_scale(self) -> float | None:
        """The fp16 GradScaler's current scale ``S`` (every pass's gradient is of ``S·L``), or ``None``."""
        return loss_scale_of(getattr(self.accelerator, "scaler", None), self.args.device)

    def _record(self, stats: dict[str, Tensor], hyper) -> None:
        """Keep this pass's figures for the next log; ``hyper`` is the step's (its ρ is the one the passes used)."""
        if "overflow" in stats:
            self.gam_counters["overflow_steps"] += 1
            return
        if "nonfinite_fallback" in stats:
            self.gam_counters["nonfinite_fallbacks"] += 1
            logger.warning("step %d: a perturbed pass of gam_mode=%r gave a non-finite gradient; this micro-batch "
                           "uses the clean gradient (%d fallbacks so far)", self.state.global_step,
                           self.args.gam_mode, self.gam_counters["nonfinite_fallbacks"])
        self._gam_rho_used = hyper.sam_rho if self.args.gam_mode == "sam" else hyper.rho  # the radius it ascends by
        values = {"gam/grad_norm": stats["grad_norm"]}
        if "ascent_grad_norm" in stats:
            values["gam/ascent_grad_norm"] = stats["ascent_grad_norm"]
            if self.gam_spec.norm_ascent:
                values["gam/r1"] = hyper.rho * stats["ascent_grad_norm"]
        if self._gam_sums is None:
            self._gam_sums = torch.zeros(2 * len(LOGGED), dtype=torch.float64, device=stats["grad_norm"].device)
        with torch.no_grad():  # running sums on the device: no host sync per step, nothing kept per step
            for i, key in enumerate(LOGGED):
                if key in values:
                    self._gam_sums[2 * i] += values[key].detach().double()
                    self._gam_sums[2 * i + 1] += 1

    # ------------------------------------------------------------------------------------ bookkeeping
    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's count of one forward+backward, times the passes of the mode on its active steps
        (an exact HVP counted as two passes)."""
        flos = super().floating_point_ops(inputs)
        return flos * self.gam_spec.passes if self.gam_step_active() else flos

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs get the ``gam/*`` means since the last log, over every micro-batch of every process (one
        all-reduce of a six-number vector per log, on the logs every process writes: those with ``loss``), and
        under ``lr_proportional`` ``gam/rho``, the ρ of the last step run (not the next step's)."""
        if "loss" in logs and self.args.gam_mode != "none":
            logs.update(self._gam_means())
            if self.args.gam_rho_schedule != "constant" and self._gam_rho_used is not None:
                logs["gam/rho"] = self._gam_rho_used
            for key, count in self.gam_counters.items():
                if count:
                    logs[f"gam/{key}"] = count
        super().log(logs, start_time)

    def _gam_means(self) -> dict[str, float]:
        """Means of the recorded figures over all processes: ``[Σ, count]`` per key, summed by one all-reduce."""
        sums = torch.zeros(2 * len(LOGGED), dtype=torch.float64) if self._gam_sums is None else self._gam_sums
        self._gam_sums = None
        if world_size() > 1:
            sums = sums.to(self.args.device)
            all_reduce_([sums])
        sums = sums.cpu()
        return {key: (sums[2 * i] / sums[2 * i + 1]).item() for i, key in enumerate(LOGGED) if sums[2 * i + 1] > 0}

    def create_model_card(self, language: str | None = None, license: str | None = None,
                          tags: str | list[str] | None = None, model_name: str | None = None,
                          finetuned_from: str | None = None, tasks: str | list[str] | None = None,
                          dataset_tags: str | list[str] | None = None, dataset: str | list[str] | None = None,
                          dataset_args: str | list[str] | None = None, *, results: dict | None = None,
                          label_noise: dict | None = None, extra: dict | None = None,
                          eval_split: str | None = None, flatness: dict | None = None, **card_kwargs) -> None:
        """Write the GAM model card (:func:`hf_gam.trainer.card.render_model_card`: every ``gam_*`` value, optimizer and
        schedule, results as text and ``model-index``, the training-results table, versions, citation) to
        ``output_dir/README.md``; ``push_to_hub`` calls this, so a plain ``trainer.push_to_hub()`` gets the same
        card. The stock arguments keep their meaning (``dataset_tags``: Hub ids for the ``datasets`` metadata,
        ``dataset_args``: the dataset's config name); ``finetuned_from`` defaults to the model's Hub id (a local
        path is not linked); a PEFT model keeps PEFT's metadata (``library_name: peft``, adapter tags). ``results``
        default to the last evaluation's metrics; ``flatness`` (a :func:`hf_gam.run_flatness` result written to
        ``output_dir/flatness``) adds its section. ``tasks`` is accepted for compatibility (the card's task is
        image classification). Mixed with a Trainer subclass that writes its own card (TRL's), that card is written,
        tagged with the mode (``card_kwargs`` are its arguments, e.g. TRL's ``dataset_name``)."""
        own_card = self.gam_integration.card_arguments(self, model_name=model_name, tags=tags, **card_kwargs)
        if own_card is not None:
            return super().create_model_card(**own_card)
        if not self.is_world_process_zero():
            return
        from .card import adapter_facts, render_model_card, resolves_on_hub, training_results_table

        if results is None:
            evals = [h for h in self.state.log_history if any(k.startswith("eval_") for k in h)]
            results = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")}
        model = self.accelerator.unwrap_model(self.model)
        adapter = adapter_facts(model, is_base=resolves_on_hub)
        if finetuned_from is None:  # inferred from the model, not named by the user: linked only if the Hub knows it
            inferred = getattr(getattr(model, "config", None), "_name_or_path", None)
            finetuned_from = adapter["base_model"] if adapter else inferred if resolves_on_hub(inferred) else None
        names = [dataset] if isinstance(dataset, str) else list(dataset or [])
        tags_list = [dataset_tags] if isinstance(dataset_tags, str) else list(dataset_tags or [])
        card = render_model_card(
            self.args, model_name=model_name or os.path.basename(os.path.normpath(self.args.output_dir)),
            base_model=finetuned_from, dataset_name=names[0] if names else (tags_list[0] if tags_list else None),
            results=results, label_noise=label_noise, extra=extra, tags=tags, eval_split=eval_split,
            flatness=flatness, license=license, language=language, dataset_tags=tags_list or None,
            dataset_args=dataset_args[0] if isinstance(dataset_args, (list, tuple)) and dataset_args else dataset_args,
            adapter=adapter, training_results=training_results_table(self.state.log_history))
        atomic_save(os.path.join(self.args.output_dir, "README.md"), card.save)

    # --------------------------------------------------------------------------------------------- Hub
    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """``Trainer.push_to_hub`` through :func:`hf_gam.trainer.hub.final_push`: run once more after a transient
        failure, then :class:`~hf_gam.errors.HubPushError` if a ``hub_strategy`` push during training failed."""
        stock = super().push_to_hub
        return final_push(lambda: stock(commit_message, blocking, token, revision, private, **dict(kwargs)),
                          self._hub_pushes, self.hub_model_id or self.args.hub_model_id, blocking)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The stock background push of a save (``hub_strategy``), its futures watched: a failure is logged with
        the step and the repo when it happens, and raised by the final :meth:`push_to_hub`."""
        super()._push_from_checkpoint(checkpoint_folder)
        if getattr(self, "push_in_progress", None) is not None:
            self._hub_pushes.watch(self.push_in_progress.jobs, self.state.global_step, self.hub_model_id)
