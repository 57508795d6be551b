"""A small GAMTrainer run that tests interrupt with real signals (tests/test_faults.py): python or torchrun.

``fault_run.py OUT [key=value ...]``: keys ``mode`` (gam_fast), ``steps`` (24), ``save_steps`` (4), ``jit`` (0/1:
``enable_jit_checkpoint``), ``sleep`` (seconds slept inside every step, between the passes, so that a signal lands
there), ``save_sleep`` (seconds slept inside every checkpoint save, between the weights and the optimizer files),
``resume`` (1: ``train(resume_from_checkpoint=True)`` when OUT holds a checkpoint), ``fail_open`` (``NAME@N``:
opening a file NAME for writing fails with ENOSPC from the save of step N on). Every rank writes its pid to
``OUT/pid-rank{r}-restart{k}`` and prints ``START restart=k rank=r``, ``STEP n`` after each step and ``SAVING n``
/ ``SAVED n`` around each save (flushed); at the end rank 0 writes the weights to ``OUT/final.pt`` and prints
``DONE``; a run stopped by SIGTERM prints ``STOPPED n`` and exits 143.
"""

import builtins
import errno
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from testing_utils import tiny_data, tiny_model  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_gam import GAMConfig, GAMTrainer  # noqa: E402
from hf_gam.cli.common import exit_process  # noqa: E402
from hf_gam.trainer.resume import last_complete_checkpoint  # noqa: E402

OUT = sys.argv[1]
OPTS = {"mode": "gam_fast", "steps": "24", "save_steps": "4", "jit": "0", "sleep": "0", "save_sleep": "0",
        "resume": "1", "fail_open": ""}
OPTS.update(kv.split("=", 1) for kv in sys.argv[2:])
RANK = int(os.environ.get("RANK", "0"))


def say(*words) -> None:
    """One marker line in one ``write`` (atomic on a pipe): the ranks share torchrun's stdout, and ``print`` with
    ``PYTHONUNBUFFERED=1`` (as in CI) writes each word on its own, so two ranks' words could interleave."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (" ".join(map(str, words)) + "\n").encode())


class Progress(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        say("STEP", state.global_step)


class FaultTrainer(GAMTrainer):
    def _mean_loss(self, model, inputs):  # a pause between the passes of a step: signals land mid-step
        if float(OPTS["sleep"]):
            time.sleep(float(OPTS["sleep"]))
        return super()._mean_loss(model, inputs)

    def _save_optimizer_and_scheduler(self, output_dir):  # weights written, optimizer not yet: a torn moment
        say("SAVING", self.state.global_step)
        if float(OPTS["save_sleep"]):
            time.sleep(float(OPTS["save_sleep"]))
        super()._save_optimizer_and_scheduler(output_dir)

    def _save_checkpoint(self, model, trial):
        name, _, step = OPTS["fail_open"].partition("@")
        if name and int(step) == self.state.global_step:
            fail_open(name)
        super()._save_checkpoint(model, trial)
        say("SAVED", self.state.global_step)


def fail_open(name: str) -> None:
    """From now on, opening a file named ``name`` for writing fails as on a full disk."""
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and os.path.basename(str(file)) == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = failing_open


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    with open(os.path.join(OUT, f"pid-rank{RANK}-restart{restart}"), "w") as f:
        f.write(str(os.getpid()))
    say(f"START restart={restart} rank={RANK}")
    args = GAMConfig(output_dir=OUT, per_device_train_batch_size=4, max_steps=int(OPTS["steps"]),
                     save_strategy="steps", save_steps=int(OPTS["save_steps"]), learning_rate=0.05,
                     lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.01, max_grad_norm=1.0,
                     gam_mode=OPTS["mode"], gam_rho_schedule="lr_proportional", report_to="none", use_cpu=True,
                     disable_tqdm=True, logging_steps=1, seed=0,
                     ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
                     enable_jit_checkpoint=OPTS["jit"] == "1", dataloader_num_workers=0)
    trainer = FaultTrainer(model=tiny_model(), args=args, train_dataset=tiny_data(n=64), callbacks=[Progress()])
    resume = OPTS["resume"] == "1" and last_complete_checkpoint(OUT, warn=False) is not None
    trainer.train(resume_from_checkpoint=True if resume else None)
    if trainer.state.global_step < args.max_steps:
        say("STOPPED", trainer.state.global_step)
        exit_process(143)
    if RANK == 0:
        torch.save({"params": [p.detach().clone() for p in trainer.model.parameters()],
                    "counters": trainer.gam_counters, "log_history": trainer.state.log_history},
                   os.path.join(OUT, "final.pt"))
    say("DONE")
    exit_process(0)


if __name__ == "__main__":
    main()
