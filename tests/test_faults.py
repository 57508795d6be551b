"""Preemption, crashes and restarts with real processes and real signals (issue 19): SIGKILL during a save, SIGTERM
with ``enable_jit_checkpoint`` (one process and two), a failing disk, torchrun restarts, and a seeded
fault-injection run. Every interrupted run resumes and ends bit-exact with the uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch
from fault_utils import ELASTIC_ENV, Run, final_of, run_to_end, same_weights, step_of

from hf_gam.trainer.resume import COMMIT_MARKER, checkpoint_problem, last_complete_checkpoint

STEPS = "steps=12"
LAUNCH = ("--standalone",)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, launched on demand: ``reference(mode, *opts, nproc=0)`` (cached)."""
    cache = {}

    def get(mode: str = "gam_fast", *opts: str, nproc: int = 0) -> dict:
        key = (mode, opts, nproc)
        if key not in cache:
            out = tmp_path_factory.mktemp("reference")
            cache[key] = run_to_end(out, *(opts or (STEPS,)), f"mode={mode}", nproc=nproc, launch=LAUNCH)
        return cache[key]

    return get


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(tmp_path, reference):
    """The issue's torn checkpoint: SIGKILL while checkpoint-8 is half written (weights there, optimizer not yet).
    The rerun skips it with a warning, resumes from checkpoint-4 and ends bit-exact."""
    run = Run(tmp_path, STEPS, "save_sleep=30")
    run.wait_for(lambda line: step_of(line, "SAVING") == 8)
    run.kill()
    torn = tmp_path / "checkpoint-8"
    assert (torn / "model.safetensors").exists() and not (torn / COMMIT_MARKER).exists()
    assert "is missing" in checkpoint_problem(torn)  # the optimizer, scheduler and RNG files are not there yet
    resumed = Run(tmp_path, STEPS)
    assert resumed.finish() == 0, resumed.text()
    assert any("skipping incomplete checkpoint" in line and "checkpoint-8" in line for line in resumed.lines)
    assert same_weights(final_of(tmp_path), reference("gam_fast"))
    assert checkpoint_problem(torn) is None, "checkpoint-8 was not written again, whole"


@pytest.mark.parametrize("mode", ["gam_fast", pytest.param("sam", marks=pytest.mark.slow),
                                  pytest.param("gam", marks=pytest.mark.slow)])
def test_sigterm_saves_between_steps_and_resumes_bit_exact(tmp_path, reference, mode):
    """SIGTERM lands between the passes of a step (each pass sleeps): the step ends with the weights restored, that
    step is saved and committed, the process exits 143; the rerun ends bit-exact, with the ρ schedule (logged
    ``gam/rho``) and the counters continuing as in the uninterrupted run."""
    run = Run(tmp_path, STEPS, f"mode={mode}", "jit=1", "sleep=0.15")
    run.wait_for(lambda line: step_of(line) == 5)
    run.signal(signal.SIGTERM)
    assert run.finish() == 143, run.text()
    stopped = next(step_of(line, "STOPPED") for line in run.lines if line.startswith("STOPPED"))
    assert 6 <= stopped < 12
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / f"checkpoint-{stopped}")
    resumed = Run(tmp_path, STEPS, f"mode={mode}", "jit=1")
    assert resumed.finish() == 0, resumed.text()
    final, ref = final_of(tmp_path), reference(mode)
    assert same_weights(final, ref), "the resumed run is not bit-exact"
    assert final["counters"] == ref["counters"]
    rho = {h["step"]: h.get("gam/rho") for h in final["log_history"] if "loss" in h}
    ref_rho = {h["step"]: h.get("gam/rho") for h in ref["log_history"] if "loss" in h}
    assert all(rho[s] == ref_rho[s] for s in rho if s > stopped) and max(rho) == 12


def test_failing_write_mid_save_names_the_path_and_keeps_the_last_checkpoint(tmp_path, reference):
    """``open`` fails (no space left) while checkpoint-8 is written: one error naming the folder and the intact
    checkpoint-4; nothing of checkpoint-8 is trusted; the rerun resumes from checkpoint-4 and ends bit-exact."""
    run = Run(tmp_path, STEPS, "fail_open=trainer_state.json@8")
    assert run.finish() != 0
    message = next(line for line in run.lines if line.startswith("hf_gam") and "WriteError" in line)
    assert str(tmp_path / "checkpoint-8") in message and "No space left on device" in message
    assert str(tmp_path / "checkpoint-4") in message and "intact" in message
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert same_weights(run_to_end(tmp_path, STEPS), reference("gam_fast"))


# ----------------------------------------------------------------------------------------- two processes
DDP = "steps=16"


@pytest.mark.distributed
def test_torchrun_restart_after_a_killed_worker_ends_bit_exact(tmp_path, reference):
    """``torchrun --max-restarts 1`` with the documented recipe: rank 1 SIGKILLed after step 10; the group restarts,
    resumes from checkpoint-8 and ends bit-exact with the uninterrupted two-process run."""
    run = Run(tmp_path, DDP, "sleep=0.02", nproc=2, launch=(*LAUNCH, "--max-restarts", "1"), env=ELASTIC_ENV)
    run.wait_for(lambda line: step_of(line) == 10)
    run.signal(signal.SIGKILL, rank=1)
    assert run.finish() == 0, run.text()
    assert os.path.exists(tmp_path / "pid-rank1-restart1"), "the group was not restarted"
    assert same_weights(final_of(tmp_path), reference("gam_fast", DDP, nproc=2))


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_sigterm_ranks_agree_on_the_stop_step(tmp_path, reference):
    """SIGTERM to rank 1 only: both ranks stop after the same step, which is saved once and committed; the rerun
    ends bit-exact."""
    run = Run(tmp_path, DDP, "jit=1", "sleep=0.1", nproc=2, launch=LAUNCH)
    run.wait_for(lambda line: step_of(line) == 5)
    run.signal(signal.SIGTERM, rank=1)
    run.finish()
    stops = {step_of(line, "STOPPED") for line in run.lines if line.startswith("STOPPED")}
    assert len(stops) == 1, run.text()
    stopped = stops.pop()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / f"checkpoint-{stopped}")
    assert same_weights(run_to_end(tmp_path, DDP, "jit=1", nproc=2, launch=LAUNCH),
                        reference("gam_fast", DDP, nproc=2))


@pytest.mark.slow
@pytest.mark.distributed
def test_ten_torchrun_restarts_in_a_row(tmp_path, reference):
    """Ten worker kills in a row, each a step after the restarted group trained its first step (``--max-restarts
    10``, alternating ranks): every restart forms the group, and the run ends bit-exact."""
    opts = ("steps=40", "save_steps=2", "sleep=0.02")
    run = Run(tmp_path, *opts, nproc=2, launch=(*LAUNCH, "--max-restarts", "10"), env=ELASTIC_ENV)
    for restart in range(10):
        run.wait_for(lambda line, k=restart: line == f"START restart={k} rank=0", timeout=600)
        run.wait_for(lambda line: step_of(line) is not None, timeout=600)
        run.signal(signal.SIGKILL, rank=restart % 2, restart=restart)
    assert run.finish(timeout=900) == 0, run.text()
    assert os.path.exists(tmp_path / "pid-rank0-restart10")
    assert same_weights(final_of(tmp_path), reference("gam_fast", opts[0], opts[1], nproc=2))


@pytest.mark.slow
def test_seeded_sigkill_fault_injection(tmp_path, reference):
    """SIGKILL at K seeded random moments (during steps and during saves: every save pauses), resume each time;
    the final weights equal the uninterrupted run's and no kill costs more than ``save_steps`` redone steps."""
    opts, save_steps, rng, redone = ("steps=64", "save_steps=4"), 4, random.Random(19), []
    while len(redone) < 8 and not os.path.exists(tmp_path / "final.pt"):
        run = Run(tmp_path, *opts, "sleep=0.05", "save_sleep=0.3")
        run.wait_for(lambda line: line.startswith("START"))
        time.sleep(rng.uniform(1.0, 4.0))  # start-up ~1-2 s, a step ~0.25 s, a save >= 0.3 s
        run.kill()
        run.finish()  # the lines printed up to the kill
        reached = max([s for s in map(step_of, run.lines) if s is not None], default=None)
        after = last_complete_checkpoint(tmp_path, warn=False)
        if reached is not None and "DONE" not in run.lines:
            redone.append(reached - (int(after.rsplit("-", 1)[1]) if after else 0))
    if not os.path.exists(tmp_path / "final.pt"):
        run_to_end(tmp_path, *opts)
    print(f"fault injection: K={len(redone)} SIGKILLs, steps redone per kill {redone} (max {max(redone, default=0)})")
    assert len(redone) == 8 and max(redone) <= save_steps
    assert same_weights(final_of(tmp_path), reference("gam_fast", *opts))


def test_restarted_process_warns_about_the_shared_store(monkeypatch, tmp_path):
    """The cause of the failed restarts: a restarted worker whose agent shares its TCPStore across restarts is warned
    (before the group is formed) to launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; the recipe silences it."""
    from hf_gam.trainer.preemption import warn_if_restart_shares_the_store

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in warn_if_restart_shares_the_store()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what the agent exports under the recipe
    assert warn_if_restart_shares_the_store() is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert warn_if_restart_shares_the_store() is None


@pytest.mark.slow
def test_cli_sigterm_exit_143_then_the_same_command_resumes(tmp_path):
    """``hf-gam train --enable_jit_checkpoint``: SIGTERM mid-run saves, exits 143 naming the checkpoint; the same
    command resumes from it and ends with the uninterrupted run's weights."""
    import subprocess
    import sys

    from fault_utils import worker_env

    def cli(out, wait_for=None):
        cmd = [sys.executable, "-m", "hf_gam", "train", "--output_dir", str(out), "--max_steps", "30",
               "--logging_steps", "1", "--disable_tqdm", "true", "--enable_jit_checkpoint", "true",
               "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64"]
        proc = subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if wait_for and wait_for in line:
                proc.send_signal(signal.SIGTERM)
                wait_for = None
        return proc.wait(timeout=600), "".join(lines)

    assert cli(tmp_path / "full")[0] == 0
    rc, text = cli(tmp_path / "run", wait_for="'epoch'")
    assert rc == 143 and "stopped by SIGTERM after saving checkpoint-" in text, text[-3000:]
    rc, text = cli(tmp_path / "run")
    assert rc == 0 and "resuming from checkpoint-" in text, text[-3000:]
    final = (tmp_path / "run" / "model.safetensors").read_bytes()
    assert final == (tmp_path / "full" / "model.safetensors").read_bytes()


@pytest.mark.distributed
def test_two_agents_nnodes_2_equal_one_process_on_the_union_batch(tmp_path):
    """Two torchrun agents on one machine (``--nnodes 2``, c10d rendezvous on 127.0.0.1), one process each: one
    ``gam_perturbation="global"`` step equals the float64 reference on the union of the two processes' batches."""
    import socket
    import subprocess
    import sys

    from fault_utils import HERE, worker_env
    from reference import direction, loss_of
    from testing_utils import HP, assert_rel, ref_kwargs, sgd_args, tiny_model

    with socket.socket() as probe:  # a free port for the rendezvous (the c10d store binds it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "hf-gam-two-agents",
           os.path.join(HERE, "workers", "ddp_step.py"), str(tmp_path), "gam:global"]
    agents = [subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), "\n".join(o[-3000:] for o in outputs)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["gam:global"] for r in range(2))
    assert r0["world"] == 2 and torch.equal(r0["theta1"], r1["theta1"])
    batches = r0["seen"] + r1["seen"]
    union = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    model = tiny_model()
    hyper = ref_kwargs(sgd_args("unused", gam_mode="gam", **HP))
    d_ref = direction("gam", loss_of(model, union), r0["theta0"], **hyper)
    assert_rel(r0["theta0"] - r0["theta1"], d_ref)
