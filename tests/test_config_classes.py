"""``GAMConfig`` combined with other ``TrainingArguments`` subclasses (no TRL needed): their fields and defaults are
kept, by ``GAMTrainer``'s conversion, by ``gam_config_class`` / ``with_gam`` and by a hand-written dataclass."""

from __future__ import annotations

import dataclasses
import pickle

from transformers import HfArgumentParser, TrainingArguments

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.trainer.config import gam_config_class, with_gam
from testing_utils import tiny_data, tiny_model


@dataclasses.dataclass
class MyArguments(TrainingArguments):
    learning_rate: float = dataclasses.field(default=0.125, metadata={"help": "my default"})
    logging_steps: float = 7
    my_field: str = "mine"


def test_gam_trainer_converts_a_subclass_to_a_combined_config(tmp_path):
    theirs = MyArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", my_field="set", seed=3,
                         hub_token="hf_secret")
    trainer = GAMTrainer(model=tiny_model(), args=theirs, train_dataset=tiny_data())
    args = trainer.args
    assert isinstance(args, MyArguments) and isinstance(args, GAMConfig) and args.gam_mode == "gam_fast"
    assert (args.my_field, args.learning_rate, args.logging_steps, args.seed) == ("set", 0.125, 7, 3)
    restored = pickle.loads(pickle.dumps(args))  # as training_args.bin: the token is not written
    assert restored.my_field == "set" and restored.hub_token is None and args.hub_token == "hf_secret"


def test_hand_written_combination_keeps_the_other_defaults():
    """Without the fix, dataclass field resolution took ``learning_rate`` and ``logging_steps`` from ``GAMConfig``'s
    inherited ``TrainingArguments`` fields (5e-05, 500)."""

    @dataclasses.dataclass
    class Combined(GAMConfig, MyArguments):
        extra: int = 2

    made = Combined(output_dir="o", gam_mode="sam")
    assert (made.learning_rate, made.logging_steps, made.my_field, made.extra, made.gam_mode) == (0.125, 7, "mine", 2,
                                                                                                    "sam")
    for cls in (Combined, gam_config_class(MyArguments)):
        parsed, = HfArgumentParser(cls).parse_args_into_dataclasses(["--output_dir", "o", "--gam_mode", "sam"])
        assert (parsed.learning_rate, parsed.logging_steps, parsed.gam_mode) == (0.125, 7, "sam")
    assert gam_config_class(MyArguments) is gam_config_class(MyArguments)
    assert with_gam(MyArguments(output_dir="o", learning_rate=0.5), gam_rho=0.1).learning_rate == 0.5
