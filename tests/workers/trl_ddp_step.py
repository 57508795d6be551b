"""Launched by tests/test_trl.py with `torchrun --nproc_per_node 2`: one gam_fast step (SGD, lr 1, float64) of
GAMSFTTrainer and GAMDPOTrainer; every rank saves θ before/after, the micro-batches it saw and its logs to
OUT/trl_rank{r}.pt."""

import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore")
import datasets  # noqa: E402
from trl import DPOConfig, SFTConfig  # noqa: E402

from hf_gam.cli.common import exit_process  # noqa: E402
from hf_gam.trl import GAMDPOTrainer, GAMSFTTrainer, with_gam  # noqa: E402
from reference import flat_params  # noqa: E402
from testing_utils import HP  # noqa: E402
from trl_utils import char_tokenizer, preference_data, text_data, tiny_llama  # noqa: E402

datasets.disable_progress_bars()
out_dir, rank = sys.argv[1], int(os.environ["RANK"])
STEP = dict(use_cpu=True, bf16=False, report_to="none", max_steps=1, per_device_train_batch_size=2, optim="sgd",
            learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, save_strategy="no",
            logging_steps=1, disable_tqdm=True, seed=0, ddp_backend="gloo")
results = {}
for kind, cls, config_cls, data, extra in (("sft", GAMSFTTrainer, SFTConfig, text_data(4), {}),
                                           ("dpo", GAMDPOTrainer, DPOConfig, preference_data(4),
                                            {"ref_model": tiny_llama(seed=1)})):
    seen = []

    class Recording(cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append({k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    model = tiny_llama()
    theta0 = flat_params(model)
    args = with_gam(config_cls(output_dir=os.path.join(out_dir, kind), **STEP), gam_mode="gam_fast", **HP)
    trainer = Recording(model=model, args=args, train_dataset=data, processing_class=char_tokenizer(), **extra)
    trainer.train()
    results[kind] = {"theta0": theta0, "theta1": flat_params(model), "seen": seen,
                     "world": trainer.accelerator.num_processes, "logs": trainer.state.log_history}
torch.save(results, os.path.join(out_dir, f"trl_rank{rank}.pt"))
dist.barrier()
exit_process(0)  # ends the process group and leaves without C++ teardown (a gloo thread there can SIGABRT)
