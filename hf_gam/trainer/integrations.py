"""What ``GAMTrainer`` needs to know about the ``Trainer`` subclass it is mixed with (:class:`TrainerIntegration`),
and the adapter for TRL's trainers (:class:`TRLIntegration`), chosen by :func:`integration_for`.

The TRL adapter reads TRL's trainers by their attributes (``_metrics``, ``_total_train_tokens``,
``compute_ref_log_probs``, ``precompute_ref_logps``) and by class name: it imports nothing of trl, so that
``GAMTrainer`` can serve ``class C(GAMTrainer, SFTTrainer)`` written by hand without importing :mod:`hf_gam.trl`.

- config: the trainer's own config class is read from its ``__init__``'s ``args`` annotation (``SFTConfig |
  TrainingArguments | None``); the arguments become ``gam_config_class(that class)`` with every value kept.
- metrics: TRL trainers record per-call metrics inside ``compute_loss`` (``num_tokens``, entropy, token accuracy,
  DPO rewards and log-probabilities, reward accuracy...). Only the clean pass of each micro-batch records them; the
  other passes run ``compute_loss`` unchanged (its collectives included) and their records are put back.
- DPO: the reference log-probabilities of a micro-batch are computed once, before the passes, and read from the
  batch by every pass (as TRL does with ``precompute_ref_log_probs``); the reference model is never perturbed.
- refused: trainers that generate inside the step, and exact-HVP modes through TRL's fused LM head.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import typing

from transformers import TrainingArguments
from transformers.utils import logging

from .config import GAMConfig, gam_config_class, with_gam
from ..core.directions import MODES
from ..errors import UserError

__all__ = ["GENERATING_TRAINERS", "TRLIntegration", "TrainerIntegration", "integration_for"]

logger = logging.get_logger("hf_gam.trainer")

# TRL trainers (and anything derived from them) that generate completions inside the training step.
GENERATING_TRAINERS = ("GRPOTrainer", "RLOOTrainer", "OnlineDPOTrainer", "PPOTrainer", "NashMDTrainer", "XPOTrainer",
                       "AsyncGRPOTrainer", "A2POTrainer", "DistillationTrainer", "AsyncDistillationTrainer",
                       "GKDTrainer", "GOLDTrainer", "IWOPDTrainer", "SDFTTrainer", "SDPOTrainer")
# TRL trainers whose loss goes through TRL's fused LM head (a custom autograd Function with no double backward:
# its backward computes with out= matmuls; measured: the double backward raises).
FUSED_HEAD_TRAINERS = ("SFTTrainer", "DPOTrainer", "KTOTrainer")
REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
TESTED_TRAINERS = ("SFTTrainer", "DPOTrainer", "RewardTrainer")  # checked against float64 references (test_trl.py)


class TrainerIntegration:
    """The stock ``transformers.Trainer``: ``GAMTrainer``'s own conversions and losses, nothing else."""

    own_head_loss = True  # GAMTrainer computes classification / regression head losses itself

    def gam_args(self, args: TrainingArguments | None, model) -> GAMConfig:
        """The ``GAMConfig`` the trainer runs with: ``args`` as they are, or converted."""
        if args is None:
            return GAMConfig(output_dir="trainer_output")
        if isinstance(args, GAMConfig):
            return args
        from .guards import as_gam_config

        return as_gam_config(args)

    def refuse(self, args: GAMConfig) -> None:
        """Raise before any compute where the mode cannot run with this trainer."""

    def prepare_micro_batch(self, trainer, inputs: dict) -> dict:
        """The micro-batch every pass of the step reads (called once per micro-batch, before the passes)."""
        return inputs

    def pass_context(self, trainer, inputs: dict, clean: bool) -> contextlib.AbstractContextManager:
        """Around each loss evaluation of ``inputs``; ``clean``: its first evaluation in this step."""
        return contextlib.nullcontext()

    def num_items(self, trainer, inputs: dict):
        """What the loss of this micro-batch is a mean over (``None``: ``GAMTrainer``'s label-element rule)."""
        return None

    def card_arguments(self, trainer, **kwargs) -> dict | None:
        """The arguments of the mixed-in Trainer's own ``create_model_card`` when its card is the one to write
        (``None``: the GAM card, :mod:`hf_gam.trainer.card`)."""
        return None


def _trl_names(trainer_class: type) -> list[str]:
    return [c.__name__ for c in trainer_class.__mro__ if c.__module__.split(".")[0] == "trl"]


def integration_for(trainer_class: type) -> TrainerIntegration:
    """:class:`TRLIntegration` when ``trainer_class`` derives from a TRL trainer, else the stock one."""
    return TRLIntegration(trainer_class) if _trl_names(trainer_class) else TrainerIntegration()


def trl_config_class(trainer_class: type) -> type | None:
    """The config class TRL's trainer takes (``SFTConfig`` for ``SFTTrainer``), from its ``args`` annotation."""
    for cls in trainer_class.__mro__:
        if cls.__module__.split(".")[0] != "trl" or "__init__" not in cls.__dict__:
            continue
        try:
            hint = typing.get_type_hints(cls.__init__).get("args")
        except Exception:
            hint = inspect.signature(cls.__init__).parameters.get("args")
            hint = getattr(hint, "annotation", None)
        for option in typing.get_args(hint) or (hint,):
            if isinstance(option, type) and issubclass(option, TrainingArguments) and option is not TrainingArguments:
                return option
    return None


class TRLIntegration(TrainerIntegration):
    """TRL's ``SFTTrainer``, ``DPOTrainer``, ``RewardTrainer`` (and their subclasses)."""

    own_head_loss = False  # TRL's trainers compute their own losses (a reward model has a 1-output head)

    def __init__(self, trainer_class: type):
        self.names = _trl_names(trainer_class)
        self.config_class = trl_config_class(trainer_class)
        self.is_dpo = "DPOTrainer" in self.names

    def gam_args(self, args, model):
        """TRL's conversions with the ``gam_*`` fields added: ``None`` becomes the trainer's config with TRL's
        defaults (its output dir named as TRL names it), plain ``TrainingArguments`` its config class (as TRL
        converts them), a TRL config keeps every value; all as ``gam_config_class(config class)``."""
        self.refuse_generating()
        if not set(self.names) & set(TESTED_TRAINERS):
            logger.warning("GAMTrainer mixed with TRL's %s: not one of the trainers hf_gam checks (%s); its loss runs "
                           "once per pass and its metrics are kept from the clean pass only", self.names[0],
                           ", ".join(TESTED_TRAINERS))
        if self.config_class is None:
            return super().gam_args(args, model)
        combined = gam_config_class(self.config_class)
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            suffix = self.names[0].removesuffix("Trainer").removeprefix("GAM") or "GAM"
            return combined(output_dir=f"{(name or 'model').split('/')[-1]}-{suffix}")
        if isinstance(args, self.config_class):
            return args if isinstance(args, GAMConfig) else with_gam(args)
        if isinstance(args, GAMConfig):  # a GAMConfig (or another combination): keep its gam_* values
            gam = {f.name: getattr(args, f.name) for f in dataclasses.fields(GAMConfig)
                   if f.name.startswith(("gam_", "sam_")) and f.init}
            return with_gam(self._as_config_class(args), **gam)
        return with_gam(self._as_config_class(args))

    def _as_config_class(self, args: TrainingArguments) -> TrainingArguments:
        names = {f.name for f in dataclasses.fields(self.config_class) if f.init}
        return self.config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)
                                    if f.init and f.name in names})

    def refuse_generating(self) -> None:
        generating = [n for n in self.names if n in GENERATING_TRAINERS]
        if generating:
            raise UserError(
                f"GAMTrainer cannot be mixed with TRL's {generating[0]}: it generates completions inside the training "
                "step (from the current weights), so every pass at perturbed weights would need its own "
                "generations and rewards, and the passes would no longer evaluate one loss at several points. "
                "Supported: SFTTrainer, DPOTrainer, RewardTrainer (hf_gam.trl).")

    def refuse(self, args: GAMConfig) -> None:
        fused = [n for n in self.names if n in FUSED_HEAD_TRAINERS]
        if MODES[args.gam_mode].hvp and fused:
            working = ", ".join(m for m, spec in MODES.items() if not spec.hvp)
            raise UserError(
                f"gam_mode={args.gam_mode!r} does not work with TRL's {fused[0]}: its loss goes through TRL's fused "
                "LM head (trl.kernels.ChunkedLogProbFunction, a custom autograd Function whose backward computes with "
                "out= matmuls, which autograd cannot differentiate: no double backward), and exact Hessian-vector "
                f"products need one. Use a first-order mode ({working}).")

    # ------------------------------------------------------------------------------- per-call metrics
    def pass_context(self, trainer, inputs, clean):
        stack = contextlib.ExitStack()
        if not clean and hasattr(trainer, "_metrics"):
            stack.enter_context(_metrics_put_back(trainer))
        if self.is_dpo and all(k in inputs for k in REFERENCE_KEYS) and not trainer.precompute_ref_logps:
            stack.enter_context(_attribute(trainer, "precompute_ref_logps", True))  # read them from the batch
        return stack

    def card_arguments(self, trainer, model_name=None, tags=None, **kwargs):
        """TRL's own card (its template, tags and citations; a language model's, not the GAM card's image classifier),
        tagged ``hf-gam`` and with the mode."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        return {"model_name": model_name, "tags": [*tags, "hf-gam", f"gam_mode-{trainer.args.gam_mode}"], **kwargs}

    def num_items(self, trainer, inputs):
        """SFT: the shifted label tokens its loss is a mean over; DPO and reward modelling: the pairs."""
        if "labels" in inputs or "shift_labels" in inputs:
            labels = inputs.get("shift_labels")
            labels = inputs["labels"][..., 1:] if labels is None else labels
            return labels.ne(-100).sum()
        return inputs["input_ids"].new_tensor(inputs["input_ids"].shape[0] // 2)

    # ----------------------------------------------------------------------- DPO reference log-probs
    def prepare_micro_batch(self, trainer, inputs):
        """DPO: the reference log-probabilities of this micro-batch, computed once (TRL's own
        ``compute_ref_log_probs``, the forward its loss would run in every pass) and put in the batch, where every
        pass reads them as under ``precompute_ref_log_probs``."""
        if not (self.is_dpo and getattr(trainer, "gam_reuse_ref_log_probs", True)):
            return inputs
        if trainer.precompute_ref_logps or all(k in inputs for k in REFERENCE_KEYS):
            return inputs
        reference = trainer.ref_model if trainer.ref_model is not None else trainer.model
        chosen, rejected = trainer.compute_ref_log_probs(reference, inputs)
        return {**inputs, REFERENCE_KEYS[0]: chosen, REFERENCE_KEYS[1]: rejected}


@contextlib.contextmanager
def _attribute(obj, name: str, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def _metrics_put_back(trainer):
    """Run a pass and put TRL's metric records (``_metrics``, ``_total_train_tokens``) back as they were."""
    saved_metrics = {mode: {k: list(v) for k, v in records.items()} for mode, records in trainer._metrics.items()}
    saved_tokens = getattr(trainer, "_total_train_tokens", None)
    try:
        yield
    finally:
        for mode, records in trainer._metrics.items():
            records.clear()
            records.update(copy.copy(saved_metrics.get(mode, {})))
        if saved_tokens is not None:
            trainer._total_train_tokens = saved_tokens
