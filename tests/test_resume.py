"""Resume from the last *complete* checkpoint (issue 19, item 1) and atomic writes (item 2).

A real GAMTrainer run writes real checkpoints; each test then tears one the way a crash does (a truncated
safetensors file, a missing optimizer file, transformers' JIT marker left behind...) and checks that the cheap scan
names the problem, that ``train(resume_from_checkpoint=True)`` resumes from the newest complete one with one warning,
that an explicitly named incomplete folder is refused, and that the resumed run ends bit-exact."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from testing_utils import tiny_data, tiny_model

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.atomic import WriteError, atomic_save, atomic_write, atomic_write_json
from hf_gam.trainer.resume import (COMMIT_MARKER, JIT_MARKER, IncompleteCheckpointError, checkpoint_problem,
                                   last_complete_checkpoint)

pytestmark = pytest.mark.usefixtures("one_thread")


def run_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, save_strategy="steps", save_steps=2,
                learning_rate=0.05, lr_scheduler_type="cosine", gam_mode="gam_fast",
                gam_rho_schedule="lr_proportional", report_to="none", use_cpu=True, disable_tqdm=True,
                logging_steps=1, seed=0)
    return GAMConfig(**{**base, **kw})


def train(out, resume=None, **kw):
    trainer = GAMTrainer(model=tiny_model(seed=7 if resume else 0), args=run_args(out, **kw),
                         train_dataset=tiny_data(n=16))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Six steps, checkpoints at 2, 4 and 6 (every one committed), and the final weights."""
    out = tmp_path_factory.mktemp("full")
    trainer = train(out)
    return out, [p.detach().clone() for p in trainer.model.parameters()]


def copy_run(full_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    return out


def truncate(path, keep):
    with open(path, "rb+") as f:
        f.truncate(keep)


def test_committed_checkpoints_are_complete(full_run):
    out, _ = full_run
    for step in (2, 4, 6):
        folder = out / f"checkpoint-{step}"
        assert checkpoint_problem(folder) is None
        assert json.loads((folder / COMMIT_MARKER).read_text())["global_step"] == step
        assert json.loads((folder / "gam_state.json").read_text())["counters"] == {
            "nonfinite_fallbacks": 0, "overflow_steps": 0}
    assert last_complete_checkpoint(out) == str(out / "checkpoint-6")


TEARS = {  # how a crash leaves a checkpoint -> the words the reason must contain
    "torn_weights": (lambda f: truncate(f / "model.safetensors", 300), "model.safetensors is truncated"),
    "torn_header": (lambda f: truncate(f / "model.safetensors", 20), "model.safetensors is truncated"),
    "no_weights": (lambda f: os.remove(f / "model.safetensors"), "weights are missing"),
    "jit_marker": (lambda f: (f / JIT_MARKER).write_text("in progress"), JIT_MARKER),
    "bad_state": (lambda f: (f / "trainer_state.json").write_text('{"global_step": 6, "lo'),
                  "trainer_state.json is not valid JSON"),
    "no_state": (lambda f: os.remove(f / "trainer_state.json"), "trainer_state.json is missing"),
    "no_optimizer": (lambda f: os.remove(f / "optimizer.pt"), "optimizer.pt is missing"),
    "torn_optimizer": (lambda f: truncate(f / "optimizer.pt", 100), "optimizer.pt is truncated"),
    "no_scheduler": (lambda f: os.remove(f / "scheduler.pt"), "scheduler.pt is missing"),
    "no_rng": (lambda f: os.remove(f / "rng_state.pth"), "RNG state"),
    "no_gam_state": (lambda f: os.remove(f / "gam_state.json"), "gam_state.json is missing"),
}


@pytest.mark.parametrize("tear", list(TEARS))
def test_scan_names_why_a_checkpoint_is_incomplete(full_run, tmp_path, tear):
    out = copy_run(full_run, tmp_path)
    damage, words = TEARS[tear]
    damage(out / "checkpoint-6")
    problem = checkpoint_problem(out / "checkpoint-6")
    assert problem is not None and words in problem, problem
    assert checkpoint_problem(out / "checkpoint-4") is None


def test_resume_skips_the_torn_newest_checkpoint_and_ends_bit_exact(full_run, tmp_path, caplog):
    """The issue's case: a kill during a save leaves checkpoint-6 with a half-written model.safetensors (the stock
    Trainer dies with 'SafetensorError: incomplete metadata'). Resume skips it with one warning and ends bit-exact."""
    out = copy_run(full_run, tmp_path)
    truncate(out / "checkpoint-4" / "model.safetensors", 300)  # now 4 and 6 are torn, 2 is whole
    (out / "checkpoint-6" / JIT_MARKER).write_text("in progress")
    with caplog.at_level(logging.WARNING):
        resumed = train(out, resume=True)
    skipped = [r.getMessage() for r in caplog.records if "skipping incomplete checkpoint" in r.getMessage()]
    assert len(skipped) == 2 and "checkpoint-6" in skipped[0] and JIT_MARKER in skipped[0], skipped
    assert "checkpoint-4" in skipped[1] and "model.safetensors is truncated" in skipped[1]
    final = [p.detach() for p in resumed.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(full_run[1], final)), "the resumed run is not bit-exact"
    assert checkpoint_problem(out / "checkpoint-4") is None, "the torn folder was not saved again whole"
    assert checkpoint_problem(out / "checkpoint-6") is None


def test_named_incomplete_checkpoint_is_refused(full_run, tmp_path):
    out = copy_run(full_run, tmp_path)
    os.remove(out / "checkpoint-4" / "optimizer.pt")
    with pytest.raises(IncompleteCheckpointError, match=r"checkpoint-4.*optimizer.pt is missing"):
        train(out, resume=str(out / "checkpoint-4"))


def test_no_complete_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(tmp_path, resume=True)


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"accuracy": 0.5})
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as f:
            f.write('{"accuracy": 0.')
            raise KeyboardInterrupt  # a crash in the middle of the write
    assert json.loads(target.read_text()) == {"accuracy": 0.5}

    def failing_writer(path):
        with open(path, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=f"could not write {target}: No space left on device"):
        atomic_save(target, failing_writer)
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"], "a temporary file was left behind"
