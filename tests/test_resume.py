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


# ------------------------------------------------------------------------------------ hf-gam train resumes itself
CLI_RUN = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--disable_tqdm", "true",
           "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One finished ``hf-gam train`` run (the embedded digits job, 4 steps, checkpoints at 2 and 4)."""
    from hf_gam.cli import main

    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--output_dir", str(out), *CLI_RUN]) == 0
    return out


def test_cli_resumes_from_the_last_complete_checkpoint(cli_run, tmp_path, capsys):
    """A run killed while saving checkpoint-4 (no final outputs yet, checkpoint-4 torn): the same command prints
    'resuming from checkpoint-2' and ends with the same weights as the uninterrupted run."""
    from hf_gam.cli import main

    out = tmp_path / "run"
    shutil.copytree(cli_run / "checkpoint-2", out / "checkpoint-2")
    shutil.copytree(cli_run / "checkpoint-4", out / "checkpoint-4")
    truncate(out / "checkpoint-4" / "model.safetensors", 1000)
    capsys.readouterr()
    assert main(["train", "--output_dir", str(out), *CLI_RUN]) == 0
    err = capsys.readouterr().err
    assert "resuming from checkpoint-2" in err
    assert (out / "model.safetensors").read_bytes() == (cli_run / "model.safetensors").read_bytes()


@pytest.mark.parametrize("setup, words", [
    ("finished", "already holds a finished run (all_results.json); pass --overwrite_output_dir"),
    ("foreign", "holds files that are not from an hf-gam run (notes.txt); pass --overwrite_output_dir"),
    ("named_torn", "cannot be resumed from: optimizer.pt is missing"),
])
def test_cli_refuses_what_it_cannot_resume(cli_run, tmp_path, capsys, setup, words):
    from hf_gam.cli import main

    out = tmp_path / "run"
    shutil.copytree(cli_run, out)
    flags = []
    if setup == "foreign":
        shutil.rmtree(out)
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if setup == "named_torn":
        os.remove(out / "checkpoint-4" / "optimizer.pt")
        flags = ["--resume_from_checkpoint", str(out / "checkpoint-4"), "--overwrite_output_dir", "true"]
    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["train", "--output_dir", str(out), *CLI_RUN, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert sorted(p.name for p in out.rglob("*")) == before, "something was written or removed"


def test_cli_overwrite_output_dir_trains_from_scratch(cli_run, tmp_path):
    from hf_gam.cli import main

    out = tmp_path / "run"
    shutil.copytree(cli_run, out)
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"stale")
    assert main(["train", "--output_dir", str(out), *CLI_RUN, "--overwrite_output_dir", "true"]) == 0
    assert (out / "model.safetensors").read_bytes() == (cli_run / "model.safetensors").read_bytes()
    assert checkpoint_problem(out / "checkpoint-4") is None


def test_resuming_a_finished_run_trains_nothing(full_run, tmp_path):
    """The stock Trainer resumed from a checkpoint at ``max_steps`` trains one more step (and saves checkpoint-7);
    a crash after the last save must not change the result: the final weights are loaded, no step is trained."""
    out = copy_run(full_run, tmp_path)
    resumed = train(out, resume=True)
    assert resumed.state.global_step == 6 and not (out / "checkpoint-7").exists()
    assert all(torch.equal(a, b) for a, b in zip(full_run[1], resumed.model.parameters()))
