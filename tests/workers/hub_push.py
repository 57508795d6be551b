"""Launched by tests/test_hub_trainer.py with HF_ENDPOINT pointing at the local Hub: GAMTrainer(..., push_to_hub=True)
in a user's script (huggingface_hub reads HF_ENDPOINT at import, hence a process of its own).

``hub_push.py peft OUT``: a LoRA adapter on the tiny ViT base ``me/tiny-vit-base`` (pulled from the Hub), two GAM
steps, evaluated, pushed with ``dataset_tags`` / ``dataset`` given as a user would.
``hub_push.py strategies ROOT``: two GAM steps of the tiny ViT, saved every step, pushed with ``hub_strategy``
every_save / checkpoint / all_checkpoints (repos ``me/<strategy>``) and once more to ``me/bgfail``, whose
background pushes the test makes the Hub refuse. Prints one JSON line of what happened."""

import json
import os
import sys

import numpy as np
from testing_utils import image_data, tiny_vit

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.cli.common import exit_process

BASE = "me/tiny-vit-base"


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def config(out: str, **kw) -> GAMConfig:
    return GAMConfig(output_dir=out, per_device_train_batch_size=4, max_steps=2, learning_rate=0.1, optim="sgd",
                     report_to="none", use_cpu=True, disable_tqdm=True, seed=0, push_to_hub=True, **kw)


def peft_push(out: str) -> dict:
    import peft
    from transformers import AutoModelForImageClassification

    base = AutoModelForImageClassification.from_pretrained(BASE)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      modules_to_save=["classifier"]))
    trainer = GAMTrainer(model=model, args=config(out, hub_model_id="me/peft", save_strategy="no"),
                         train_dataset=image_data(12), eval_dataset=image_data(8, seed=3), compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    commit = trainer.push_to_hub(dataset_tags="tiny-shapes", dataset="Tiny shapes")
    return {"metrics": metrics, "commit": commit.oid}


def strategy_push(root: str, strategy: str, repo: str) -> dict:
    trainer = GAMTrainer(model=tiny_vit(), args=config(os.path.join(root, repo), hub_model_id=f"me/{repo}",
                                                       hub_strategy=strategy, save_strategy="steps", save_steps=1,
                                                       hub_always_push=True),
                         train_dataset=image_data(12))
    trainer.train()
    try:
        trainer.push_to_hub()
    except Exception as err:  # noqa: BLE001 - reported to the test
        return {"error": type(err).__name__, "message": str(err)}
    return {"error": None}


if __name__ == "__main__":
    what, where = sys.argv[1], sys.argv[2]
    if what == "peft":
        result = peft_push(where)
    else:
        result = {s: strategy_push(where, s, s) for s in ("every_save", "checkpoint", "all_checkpoints")}
        result["bgfail"] = strategy_push(where, "checkpoint", "bgfail")
    print(json.dumps(result))
    sys.stdout.flush()
    exit_process(0)
