"""Resume on a new machine from the Hub's ``last-checkpoint`` (``--hub_strategy checkpoint``), the README's
commands against the local Hub: ``hf download ... --include 'last-checkpoint/*'`` then ``hf-gam train ...
--resume_from_checkpoint``; the resumed run ends bit-exact with the uninterrupted one. Three launched processes
(about a minute on two busy cores): slow."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from local_hub import serving
from test_hub_push import hf_gam_env, run_hf_gam

RUN = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
       "--disable_tqdm", "true", "--seed", "0"]


@pytest.mark.slow
def test_new_machine_resumes_from_the_hubs_last_checkpoint_bit_exact(tmp_path):
    from safetensors.torch import load_file

    with serving(tmp_path / "hf_home") as hub:
        first = tmp_path / "first"
        proc = run_hf_gam([*RUN, "--output_dir", first, "--push_to_hub", "true", "--hub_strategy", "checkpoint",
                           "--hub_model_id", "me/resume"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # the Hub as the first machine left it had it died after step 2: the commit holding step 2's checkpoint
        at_step_2 = next(c for c in hub.commits("me/resume") if "last-checkpoint/trainer_state.json" in c.files
                         and json.loads(c.files["last-checkpoint/trainer_state.json"])["global_step"] == 2)

        machine = tmp_path / "new_machine"
        machine.mkdir()
        env = hf_gam_env(HF_HOME=str(machine / "hf_home"))  # an empty cache
        download = subprocess.run(["hf", "download", "me/resume", "--revision", at_step_2.oid, "--include",
                                   "last-checkpoint/*", "--local-dir", "from_hub"], capture_output=True, text=True,
                                  env=env, cwd=machine, timeout=300)
        assert download.returncode == 0, download.stderr[-3000:]
        resumed = run_hf_gam([*RUN, "--output_dir", machine / "out", "--resume_from_checkpoint",
                              machine / "from_hub" / "last-checkpoint"], cwd=machine, HF_HOME=str(machine / "hf_home"))
        assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = load_file(first / "model.safetensors"), load_file(machine / "out" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    losses = [[h["loss"] for h in json.loads((d / "trainer_state.json").read_text())["log_history"] if "loss" in h]
              for d in (first, machine / "out")]
    assert len(losses[0]) == 4 and losses[1] == losses[0]  # steps 1-2 come with the checkpoint's trainer_state
