"""``DurableTrainerMixin``: what GAMTrainer adds so that an interrupted run loses nothing it trained.

- ``train(resume_from_checkpoint=True)`` resumes from the newest *complete* checkpoint; a named torn folder is refused
  (:mod:`hf_gam.trainer.resume`);
- every checkpoint gets a commit marker written last, after every process finished; old checkpoints are rotated
  out only after it (:func:`hf_gam.trainer.resume.save_committed_checkpoint`); a failed write names the folder and
  the checkpoint that is still whole;
- model files, metrics and the trainer state are written to temporary names and renamed (:mod:`hf_gam.atomic`);
- SIGTERM with ``enable_jit_checkpoint``: every process saves the same step, then ``train`` returns with
  :attr:`preempted` set (:mod:`hf_gam.trainer.preemption`);
- ``gam_state.json`` (the trainer's ``gam_counters``) next to the optimizer state, and checkpoint weights restored
  strictly through the model's key conversion (:mod:`hf_gam.trainer.checkpoints`), for resume and the best model.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from ..atomic import atomic_save, atomic_write_json, staged_folder
from .resume import GAM_STATE_NAME

__all__ = ["DurableTrainerMixin"]


class DurableTrainerMixin:
    """Mixed into a ``transformers.Trainer`` subclass, before ``Trainer`` in the bases (no ``__init__``: the
    subclass binds the mixed-in Trainer's own signature)."""

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """As ``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest complete checkpoint of
        ``output_dir`` (newer torn ones skipped with one warning each); a named folder must be complete."""
        from .preemption import install_agreed_stop
        from .resume import resolve_resume_checkpoint

        if not hasattr(self, "_agreed_stop"):  # once per trainer; None without enable_jit_checkpoint
            self._agreed_stop = install_agreed_stop(self)
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None and self._finished_at(checkpoint):
            return self._restore_finished(checkpoint)
        return super().train(checkpoint, *args, **kwargs)

    def _finished_at(self, checkpoint: str) -> bool:
        """Whether ``checkpoint`` already reached ``max_steps`` (the stock Trainer would train one more step)."""
        from transformers.trainer_callback import TrainerState

        state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        return self.args.max_steps > 0 and state.global_step >= self.args.max_steps

    def _restore_finished(self, checkpoint: str):
        """Resuming a finished run: its weights and state, no step trained (a crash after the last save)."""
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput
        from transformers.utils import logging

        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        logging.get_logger(__name__).warning("%s already reached max_steps=%d: nothing left to train; its weights are "
                                             "loaded", checkpoint, self.args.max_steps)
        self._load_from_checkpoint(checkpoint)
        return TrainOutput(self.state.global_step, 0.0, {})

    @property
    def preempted(self) -> bool:
        """Whether the last ``train()`` stopped early on SIGTERM (``enable_jit_checkpoint``) after saving."""
        agreed = getattr(self, "_agreed_stop", None)
        stop = None if agreed is None else agreed.stopped_at
        return stop is not None and stop < self.state.max_steps

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from .resume import save_committed_checkpoint

        save_committed_checkpoint(self, model, trial, super()._save_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Model, config, processor and arguments written into a staging folder, then renamed file by file."""
        output_dir = self.args.output_dir if output_dir is None else output_dir
        if not self.args.should_save:
            return super()._save(output_dir, state_dict=state_dict)
        os.makedirs(output_dir, exist_ok=True)
        with staged_folder(output_dir) as staging:
            super()._save(staging, state_dict=state_dict)

    def save_metrics(self, split: str, metrics: dict[str, Any], combined: bool = True) -> None:
        """``Trainer.save_metrics`` with atomic writes (``{split}_results.json``, ``all_results.json``)."""
        if not self.is_world_process_zero():
            return
        atomic_write_json(os.path.join(self.args.output_dir, f"{split}_results.json"), metrics, sort_keys=True)
        if combined:
            path = os.path.join(self.args.output_dir, "all_results.json")
            merged = {}
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    merged = json.load(f)
            atomic_write_json(path, {**merged, **metrics}, sort_keys=True)

    def save_state(self) -> None:
        if self.is_world_process_zero():
            atomic_save(os.path.join(self.args.output_dir, "trainer_state.json"), self.state.save_to_json)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Also write ``gam_state.json`` (the counters; the ``gam_every`` phase is ``global_step`` and the ρ
        schedule follows the restored learning-rate scheduler, so nothing else is needed to resume exactly)."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            atomic_write_json(os.path.join(output_dir, GAM_STATE_NAME), {"version": 1, "counters": self.gam_counters})

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, GAM_STATE_NAME) if checkpoint else None
        if path and os.path.isfile(path):
            with open(path) as f:
                self.gam_counters.update(json.load(f)["counters"])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume restores every tensor, through the model's own key conversion, or fails loudly
        (:mod:`hf_gam.trainer.checkpoints`; the stock method skips ViT's / Swin's legacy-named tensors silently)."""
        from .checkpoints import restore_checkpoint_weights

        if not restore_checkpoint_weights(self, resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's weights, restored as in :meth:`_load_from_checkpoint`."""
        from .checkpoints import restore_checkpoint_weights

        if not restore_checkpoint_weights(self, self.state.best_model_checkpoint):
            super()._load_best_model()
