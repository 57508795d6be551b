"""GAMTrainer in one process that sees several GPUs (the Trainer's torch.nn.DataParallel): the passes need one scalar
loss per micro-batch, while DataParallel gathers one loss per GPU and splits num_items_in_batch per GPU, so the first
step crashed deep inside the step (a vector weight in accumulate_grads_, or autograd.grad of a vector loss). Refused
at construction instead, with the way out. On the CPU the device count is set by hand (DataParallel itself needs
GPUs)."""

from __future__ import annotations

import pytest
from testing_utils import sgd_args, tiny_model

from hf_gam import GAMTrainer


def as_if_two_gpus(args):
    args.n_gpu  # resolves the devices (cached), then one process "sees" two GPUs
    args._n_gpu = 2
    return args


def test_data_parallel_refused_before_any_compute(tmp_path):
    args = as_if_two_gpus(sgd_args(tmp_path, gam_mode="sam"))
    with pytest.raises(ValueError, match=r"gam_mode='sam' does not run under torch.nn.DataParallel .*n_gpu=2.*"
                                         r"torchrun --nproc_per_node 2"):
        GAMTrainer(model=tiny_model(), args=args)


def test_data_parallel_with_mode_none_is_the_stock_trainer(tmp_path):
    GAMTrainer(model=tiny_model(), args=as_if_two_gpus(sgd_args(tmp_path, gam_mode="none")))
