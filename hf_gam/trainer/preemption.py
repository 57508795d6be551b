"""SIGTERM under ``enable_jit_checkpoint``: every process saves the same step, with the weights unperturbed.

transformers' JIT checkpoint (``trainer_jit_checkpoint``) arms a 3-second timer per process when SIGTERM arrives and
saves at whichever callback sees the flag first (``on_step_begin``, ``on_pre_optimizer_step``, ``on_step_end``).
Under several processes SIGTERM reaches them at different moments, so they stop at different steps (and hang in
each other's collectives). :class:`AgreedStopCallback` replaces that SIGTERM handler with one that only records the
signal; at the end of every optimizer step the processes agree (one MAX all-reduce of one integer, as Lightning
does) and, when any of them was signalled, every one requests the JIT save for that same step. The save happens at
the end of a step: the step's passes have restored the weights (a signal between two passes only sets the flag), and
the checkpoint is the same one a regular ``save_steps`` save would write there, so the resumed run is bit-exact.
"""

from __future__ import annotations

import os
import signal

from transformers import TrainerCallback
from transformers.utils import logging

from ..core.collectives import reached_on_any_process

__all__ = ["AgreedStopCallback", "install_agreed_stop", "warn_if_restart_shares_the_store"]

logger = logging.get_logger(__name__)


class AgreedStopCallback(TrainerCallback):
    """Records SIGTERM; at each step end all processes agree whether any got it and then save that step."""

    def __init__(self, jit_manager):
        self.jit_manager = jit_manager
        self.signalled = False
        self.stopped_at: int | None = None  # the step saved and stopped at, once preempted

    def on_train_begin(self, args, state, control, **kwargs):
        """Every ``train()``: take SIGTERM over (the JIT callback restores the original handler at its end)."""
        self.signalled, self.stopped_at = False, None
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return control

    def _on_sigterm(self, signum, frame) -> None:
        if not self.signalled:
            logger.warning("SIGTERM received (process %s): saving a checkpoint at the end of this step, then stopping",
                           os.environ.get("RANK", "0"))
        self.signalled = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and reached_on_any_process([self.signalled], args.device)[0]:
            self.stopped_at = state.global_step
            self.jit_manager.is_checkpoint_requested = True  # the JIT callback (next in line) saves and stops
        return control


def install_agreed_stop(trainer) -> AgreedStopCallback | None:
    """With ``enable_jit_checkpoint``, put an :class:`AgreedStopCallback` just before transformers' JIT callback and
    take over its SIGTERM handler; return it (``None`` without JIT checkpoints)."""
    from transformers.trainer_jit_checkpoint import JITCheckpointCallback

    callbacks = trainer.callback_handler.callbacks
    index = next((i for i, cb in enumerate(callbacks) if isinstance(cb, JITCheckpointCallback)), None)
    if index is None or callbacks[index].jit_manager is None:
        return None
    agreed = AgreedStopCallback(callbacks[index].jit_manager)
    callbacks.insert(index, agreed)
    return agreed


def warn_if_restart_shares_the_store() -> str | None:
    """Under ``torchrun --max-restarts`` the elastic agent shares one TCPStore across restarts by default; the
    restarted ranks can then read the dead ranks' gloo/NCCL addresses from it and fail to form the group
    ("Connection refused", ``connectFullMesh`` timeout). Warn a restarted process (and return the message) unless the
    run was launched with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (docs/reliability.md)."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    message = (f"restart {restart} of a torchrun group whose rendezvous store is shared across restarts: the group may "
               "fail to connect (stale addresses of the dead processes); launch with "
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see docs/reliability.md)")
    logger.warning(message)
    return message
