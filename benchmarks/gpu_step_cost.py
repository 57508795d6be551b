"""The step-cost table on a CUDA machine: ResNet-18 and ViT-S/16 at 224x224 (timm architectures through
``TimmWrapperForImageClassification``, random weights, 1000 classes), bf16 and fp16 autocast, every ``gam_mode``
(and ``gam_fast`` with ``gam_every=10``) against the plain ``transformers.Trainer`` step; images per second, ratio,
and the peak extra CUDA memory of a step in units of the parameter size P (``torch.cuda.max_memory_allocated``).

The model and optimizer go through ``accelerator.prepare`` exactly as ``Trainer.train`` does it, so autocast wraps
``forward`` and fp16 uses the Trainer's GradScaler; a step is ``training_step`` + ``optimizer.step()`` +
``zero_grad`` (``_common.optimizer_step``), modes interleaved round-robin, timed with ``torch.cuda.synchronize``.
Paper Table 7 (CIFAR-10, SGD vs GAM): 2,593 vs 658 img/s (0.25x).

    python benchmarks/gpu_step_cost.py                          # on a CUDA machine, ~5-10 minutes
    python benchmarks/gpu_step_cost.py --models resnet18 --dtypes bf16 --batch 128 --rounds 10
    python benchmarks/gpu_step_cost.py --tiny --device cpu      # smoke run of the code path on CPU (bf16 only)
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (CASES, git_commit, interleaved_times, make_trainer, num_params,  # noqa: E402
                     optimizer_step, param_bytes, step_flops, summarize, tmp_output_dir, write_report)

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHS = {"resnet18": "resnet18", "vit_s": "vit_small_patch16_224"}
TINY_ARCHS = {"resnet18": "test_resnet", "vit_s": "test_vit"}


def build(arch: str, num_labels: int, seed: int = 0):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(seed)
    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture=arch, num_labels=num_labels))


def prepared_trainers(model, device: str, dtype: str) -> dict:
    trainers = {}
    for label, overrides in CASES:
        kw = {"bf16": dtype == "bf16", "fp16": dtype == "fp16", "use_cpu": device == "cpu"}
        trainer = make_trainer(copy.deepcopy(model), overrides, tmp_output_dir(), **kw)
        # what Trainer.train does: autocast-wrapped forward, AcceleratedOptimizer (GradScaler under fp16)
        trainer.model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.model_wrapped = trainer.model
        trainers[label] = trainer
    return trainers


def cuda_peak(trainer, batch, n) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    optimizer_step(trainer, batch, n)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run(models, dtypes, batch_size, image_size, rounds, device, tiny):
    archs = TINY_ARCHS if tiny else ARCHS
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for name in models:
        base_model = build(archs[name], 1000 if not tiny else 10)
        P = param_bytes(base_model)
        g = torch.Generator().manual_seed(1)
        batch = {"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device),
                 "labels": torch.randint(0, base_model.config.num_labels, (batch_size,), generator=g).to(device)}
        n = torch.tensor(batch_size, device=device)
        for dtype in dtypes:
            trainers = prepared_trainers(base_model, device, dtype)
            times = interleaved_times(trainers, batch, rounds, block=lambda lb: 10 if "every 10" in lb else 1,
                                      sync=sync)
            summary = summarize(times)
            flops = {}
            for label, trainer in trainers.items():
                trainer.state.global_step = 0  # "every 10": ten steps hold exactly one GAM step
                flops[label] = step_flops(trainer, batch, n, steps=10 if "every" in label else 1)
            peaks = {}
            if device == "cuda":
                for label, trainer in trainers.items():
                    trainer.state.global_step = 0
                    peaks[label] = cuda_peak(trainer, batch, n) / P
            for label, _ in CASES:
                s = summary[label]
                rows.append({"model": name, "arch": archs[name], "params": num_params(base_model), "dtype": dtype,
                             "mode": label, "median_ms": s["median_ms"], "ratio": s["ratio"],
                             "flop_ratio": flops[label] / flops["Trainer (plain)"],
                             "img_per_s": batch_size / (s["median_ms"] / 1e3),
                             "peak_over_P": peaks.get(label), "beyond_plain_over_P":
                             None if not peaks else peaks[label] - peaks["Trainer (plain)"]})
            del trainers
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def render(rows, header) -> str:
    lines = [header, "", "| model | dtype | mode | median ms | img/s | x plain | FLOPs x plain | peak mem / P "
             "| beyond plain / P |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pk = "" if r["peak_over_P"] is None else f"{r['peak_over_P']:.2f}"
        bp = "" if r["beyond_plain_over_P"] is None else f"{r['beyond_plain_over_P']:+.2f}"
        lines.append(f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {r['dtype']} | {r['mode']} | "
                     f"{r['median_ms']:.1f} | {r['img_per_s']:,.0f} | {r['ratio']:.2f}x | {r['flop_ratio']:.2f}x | {pk} | "
                     f"{bp} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,vit_s")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="timm test_* architectures, 32 px, batch 4, 1 round")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "step_cost_gpu.md"), help="'' to skip")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_step_cost.py: no CUDA device here (use --device cpu --tiny for a smoke run of the code path)")
        return None
    if a.tiny:
        a.batch, a.image_size, a.rounds = 4, 32, 1
    dtypes = [d for d in a.dtypes.split(",") if d]
    if a.device == "cpu" and "fp16" in dtypes:
        print("fp16 autocast is refused on CPU by accelerate; running bf16 only")
        dtypes = [d for d in dtypes if d != "fp16"]
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        dev = torch.cuda.get_device_name()
    else:
        dev = f"CPU ({torch.get_num_threads()} threads)"
    header = (f"# Step cost on {dev}\n\ntorch {torch.__version__}, hf_gam commit {git_commit()}, "
              f"{time.strftime('%Y-%m-%d')}; batch {a.batch} at {a.image_size}px, {a.rounds} interleaved rounds "
              "after 2 warm-up rounds, median; ratio: median over rounds of the step over the plain "
              "`transformers.Trainer` step run right before it; FLOPs: matmul/conv/attention FLOPs "
              "(`torch.utils.flop_counter`) over the plain step's; images/s = batch / median step time; memory: peak CUDA bytes allocated by one step above those live before it, over "
              "the fp32 parameter size P.")
    rows = run([m for m in a.models.split(",") if m], dtypes, a.batch, a.image_size, a.rounds, a.device, a.tiny)
    text = render(rows, header)
    write_report(text, a.out, a.json, rows)
    return rows


if __name__ == "__main__":
    main()
