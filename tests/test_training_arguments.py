"""Bad values of the Trainer's own ``TrainingArguments`` fields end before training (issue 19, item 8): one
``ValueError`` naming the field and the value from ``GAMConfig`` / ``GAMTrainer``, one ``hf-gam: error:`` line and
exit status 2 from the CLI, before any compute and with nothing written."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.cli import main
from hf_gam.trainer.config import check_training_arguments

BASE = dict(report_to="none", use_cpu=True)
# (kwargs, the field the message names, the value it shows)
BAD = {
    "train_batch_0": ({"per_device_train_batch_size": 0}, "per_device_train_batch_size", "0"),
    "eval_batch_0": ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size", "0"),
    "accumulation_0": ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps", "0"),
    "lr_nan": ({"learning_rate": float("nan")}, "learning_rate", "nan"),
    "lr_inf": ({"learning_rate": float("inf")}, "learning_rate", "inf"),
    "lr_negative": ({"learning_rate": -0.1}, "learning_rate", "-0.1"),
    "seed_negative": ({"seed": -3}, "seed", "-3"),
    "data_seed_huge": ({"data_seed": 2**40}, "data_seed", str(2**40)),
    "zero_steps": ({"num_train_epochs": -1, "max_steps": -1}, "num_train_epochs", "-1"),
    "epochs_nan": ({"num_train_epochs": float("nan")}, "num_train_epochs", "nan"),
    "eval_steps_negative": ({"eval_strategy": "steps", "eval_steps": -3}, "eval_steps", "-3"),  # 0: logging_steps
    "save_steps_negative": ({"save_strategy": "steps", "save_steps": -5}, "save_steps", "-5"),
    "logging_steps_negative": ({"logging_steps": -1}, "logging_steps", "-1"),
    "weight_decay_nan": ({"weight_decay": float("nan")}, "weight_decay", "nan"),
    "max_grad_norm_negative": ({"max_grad_norm": -1.0}, "max_grad_norm", "-1.0"),
    "adam_beta1_1": ({"adam_beta1": 1.0}, "adam_beta1", "1.0"),
    "adam_epsilon_negative": ({"adam_epsilon": -1e-8}, "adam_epsilon", "-1e-08"),
    "label_smoothing_1": ({"label_smoothing_factor": 1.0}, "label_smoothing_factor", "1.0"),
    "workers_negative": ({"dataloader_num_workers": -1}, "dataloader_num_workers", "-1"),
    "eval_accumulation_0": ({"eval_accumulation_steps": 0}, "eval_accumulation_steps", "0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_gam_config_names_the_field_and_the_value(tmp_path, case):
    kwargs, name, shown = BAD[case]
    with pytest.raises(ValueError, match=rf"^{name}.*{shown}"):
        GAMConfig(output_dir=str(tmp_path / "out"), **BASE, **kwargs)
    assert not (tmp_path / "out").exists()


def test_plain_training_arguments_are_checked_by_the_trainer(tmp_path):
    """``GAMTrainer(args=TrainingArguments(...))`` converts to a GAMConfig, and the same check runs there."""
    from testing_utils import tiny_data, tiny_model

    args = TrainingArguments(output_dir=str(tmp_path / "out"), **BASE, per_device_train_batch_size=0)
    with pytest.raises(ValueError, match="per_device_train_batch_size must be an integer >= 1; got 0"):
        GAMTrainer(model=tiny_model(), args=args, train_dataset=tiny_data())


def test_unused_intervals_are_not_checked(tmp_path):
    """``eval_steps`` / ``save_steps`` only matter under their ``"steps"`` strategy."""
    GAMConfig(output_dir=str(tmp_path), **BASE, eval_strategy="no", eval_steps=0, save_strategy="no", save_steps=0)


def test_output_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"output_dir=.*a_file/run.* cannot be created: .*a_file is not a folder"):
        GAMConfig(output_dir=str(tmp_path / "a_file" / "run"), **BASE)
    config = GAMConfig(output_dir=str(tmp_path / "fine" / "deep"), **BASE)
    check_training_arguments(config)  # checking creates nothing
    assert not (tmp_path / "fine").exists()


CLI_BAD = [
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
    (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    (["--learning_rate", "nan"], "learning_rate"),
    (["--seed", "-3"], "seed"),
    (["--num_train_epochs", "-1", "--max_steps", "-1"], "num_train_epochs"),
    (["--save_strategy", "steps", "--save_steps", "0"], "save_steps"),
]


@pytest.mark.parametrize("flags, name", CLI_BAD, ids=[c[1] + "-" + c[0][1] for c in CLI_BAD])
def test_cli_one_line_exit_2_nothing_written(tmp_path, capsys, flags, name):
    out = tmp_path / "out"
    assert main(["train", "--output_dir", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hf-gam: error: {name}") and flags[1] in err[0], err
    assert not out.exists()


def test_cli_output_dir_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main(["train", "--output_dir", str(tmp_path / "a_file" / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output_dir=" in err[0] and "a_file is not a folder" in err[0], err
