"""Hugging Face ``Trainer`` integration (as TRL keeps trainer and config side by side).

- :mod:`~hf_gam.trainer.config`: ``GAMConfig`` (``TrainingArguments`` + the ``gam_*`` fields, their checks).
- :mod:`~hf_gam.trainer.trainer`: ``GAMTrainer``, thin glue over :mod:`hf_gam.core.step`.
- :mod:`~hf_gam.trainer.guards`: what ``GAMTrainer`` converts (plain ``TrainingArguments``) or refuses.
- :mod:`~hf_gam.trainer.losses`: the head losses normalized by ``num_items_in_batch``.
- :mod:`~hf_gam.trainer.checkpoints`: strict checkpoint restore through the model's key conversion.
- :mod:`~hf_gam.trainer.card`: the model card and its Hub metadata (template in ``model_cards/``).
"""

from .config import GAMConfig
from .trainer import GAMTrainer

__all__ = ["GAMConfig", "GAMTrainer"]
