"""Shared pieces of the step-cost benchmarks: small models, trainers built the way users build them, one optimizer
step through the real Trainer machinery, and a CPU/CUDA peak-memory probe.

A "step" is exactly what ``Trainer._inner_training_loop`` does per optimizer step with one micro-batch:
``trainer.training_step(model, batch, num_items_in_batch)``, ``optimizer.step()``, ``model.zero_grad()`` and
``state.global_step += 1`` (``gam_every`` reads it).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (PretrainedConfig, PreTrainedModel, PrinterCallback, Trainer, TrainingArguments, ViTConfig,
                          ViTForImageClassification)
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import ImageClassifierOutput

from hf_gam import GAMConfig, GAMTrainer
from hf_gam.core.directions import MODES
from hf_gam.testing import TinyMLP, TinyMLPConfig

# (label, GAMConfig overrides); None = the stock transformers.Trainer (the baseline every ratio is taken against).
# Every registered mode at its defaults, then gam_fast on 1 step in 10.
CASES: list[tuple[str, dict | None]] = [
    ("Trainer (plain)", None),
    *((mode, {"gam_mode": mode}) for mode in MODES),
    ("gam_fast every 10", {"gam_mode": "gam_fast", "gam_every": 10}),
]

# The CPU targets: step time over the plain Trainer step.
TARGETS = {"sam": 2.03, "gam_fast": 4.05, "gam_fast every 10": 1.32, "gam": 5.0}


# ------------------------------------------------------------------------------------------------------- models
class SmallCNNConfig(PretrainedConfig):
    model_type = "hf-gam-bench-cnn"

    def __init__(self, widths=(32, 64, 128), num_labels=10, batchnorm=True, **kw):
        self.widths, self.batchnorm = list(widths), batchnorm
        super().__init__(num_labels=num_labels, **kw)


class SmallCNN(PreTrainedModel):
    """conv3x3(3->w0) then, per width, conv3x3 stride 2 + BN + ReLU; global average pool; linear head."""

    config_class = SmallCNNConfig
    main_input_name = "pixel_values"

    def __init__(self, config: SmallCNNConfig):
        super().__init__(config)
        layers, c = [], 3
        for i, w in enumerate(config.widths):
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1, bias=not config.batchnorm),
                       nn.BatchNorm2d(w) if config.batchnorm else nn.Identity(), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        pass  # PyTorch's default init (seeded by the caller)

    def forward(self, pixel_values, labels=None, **kwargs):
        logits = self.head(self.features(pixel_values).mean((2, 3)))
        loss = ForSequenceClassificationLoss(labels, logits, self.config, **kwargs) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def small_vit(image_size=32, patch=4, hidden=128, layers=4, heads=4, mlp=256, num_labels=10):
    return ViTForImageClassification(ViTConfig(
        image_size=image_size, patch_size=patch, num_channels=3, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=mlp, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=num_labels))


@dataclass
class Bench:
    """A model family of the CPU table: how to build it and the batch it steps on."""

    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch: int
    num_labels: int = 10

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.make()

    def data(self, seed: int = 1) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(self.batch, *self.input_shape, generator=g),
                "labels": torch.randint(0, self.num_labels, (self.batch,), generator=g)}


CPU_BENCHES = {
    # ~24k parameters, BatchNorm, 32x32 inputs (CIFAR-sized), batch 32
    "cnn": Bench("cnn", lambda: SmallCNN(SmallCNNConfig(widths=(16, 32, 64))), (3, 32, 32), 32),
    # ~0.23M parameters: 3 layers, width 96, 64 patches of 4x4 at 32x32, batch 32
    "vit": Bench("vit", lambda: small_vit(hidden=96, layers=3, heads=4, mlp=192), (3, 32, 32), 32),
    # ~2.1M parameters, tiny activations (batch 8): peak memory is counted in whole parameter-sized buffers
    "mlp": Bench("mlp", lambda: TinyMLP(TinyMLPConfig(in_dim=3 * 32 * 32, hidden=(512, 512, 512), num_labels=10)),
                 (3, 32, 32), 8),
    # the smoke / leak-check setting: a few thousand parameters
    "tiny": Bench("tiny", lambda: TinyMLP(TinyMLPConfig(in_dim=3 * 4 * 4, hidden=(32,), num_labels=10)), (3, 4, 4), 8),
}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------- trainers
def make_trainer(model: nn.Module, overrides: dict | None, out_dir: str, **args_kw) -> Trainer:
    """The stock ``Trainer`` (``overrides=None``) or a ``GAMTrainer`` with ``GAMConfig(**overrides)``, SGD with
    momentum (the paper's CIFAR optimizer), an optimizer created by the Trainer itself."""
    base = dict(output_dir=out_dir, per_device_train_batch_size=8, learning_rate=1e-3, optim="sgd",
                optim_args=None, report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    base.update(args_kw)
    if overrides is None:
        trainer = Trainer(model=model, args=TrainingArguments(**base))
    else:
        trainer = GAMTrainer(model=model, args=GAMConfig(**base, **overrides))
    trainer.remove_callback(PrinterCallback)  # no log lines on stdout
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); one micro-batch per step here
    trainer.create_optimizer()
    for group in trainer.optimizer.param_groups:
        group["momentum"] = 0.9
    return trainer


def optimizer_step(trainer: Trainer, batch: dict, num_items, log_every: int = 0) -> torch.Tensor:
    """One optimizer step as the Trainer's loop does it (one micro-batch, no accumulation, no clipping); with
    ``log_every`` it also logs every that many steps, as the loop does at ``logging_steps`` (GAMTrainer keeps its
    per-step figures until then)."""
    model = trainer.model
    loss = trainer.training_step(model, batch, num_items_in_batch=num_items)
    trainer.optimizer.step()
    model.zero_grad(set_to_none=True)
    trainer.state.global_step += 1
    if log_every and trainer.state.global_step % log_every == 0:
        trainer.log({"loss": float(loss)})
    return loss


def make_trainers(bench_model: nn.Module, modes, out_dir: str, **args_kw) -> dict[str, Trainer]:
    return {label: make_trainer(copy.deepcopy(bench_model), ov, out_dir, **args_kw) for label, ov in modes}


# ------------------------------------------------------------------------------------------------- timing
BASE = "Trainer (plain)"


def interleaved_times(trainers: dict[str, Trainer], batch: dict, rounds: int, warmup: int = 2,
                      block: Callable[[str], int] = lambda label: 1, sync: Callable[[], None] = lambda: None,
                      clock: Callable[[], float] = time.perf_counter, base: str = BASE) -> dict[str, list[float]]:
    """Seconds per optimizer step of every trainer, round-robin: each round runs every trainer once (``block``
    consecutive steps for a ``gam_every`` mode, recorded as their mean), in an order that rotates every round, so
    machine noise hits all modes alike. Every mode's measurement is paired with a ``base`` step taken right before
    it (recorded under ``(label, "base")``), so a ratio can be taken within the pair, where slow drift of a shared
    machine cancels. The first ``warmup`` rounds are dropped."""
    labels = [label for label in trainers if label != base]
    n = batch["labels"].numel()
    num_items = torch.tensor(n, device=batch["labels"].device)
    times: dict = {label: [] for label in trainers}

    def timed(label: str, k: int) -> float:
        trainer = trainers[label]
        if k > 1:  # start every block on an active step so each block holds exactly one GAM step
            trainer.state.global_step = 0
        sync()
        t0 = clock()
        for _ in range(k):
            optimizer_step(trainer, batch, num_items)
        sync()
        return (clock() - t0) / k

    for r in range(warmup + rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            t_base, t = timed(base, 1), timed(label, block(label))
            if r >= warmup:
                times[base].append(t_base)
                times[label].append(t)
                times.setdefault((label, "base"), []).append(t_base)
    return times


def summarize(times: dict, base: str = BASE) -> dict[str, dict[str, float]]:
    """Per mode: median milliseconds, quartiles, and ``ratio`` = the median over rounds of the mode's time over
    its paired ``base`` step (see :func:`interleaved_times`)."""
    out = {}
    for label, ts in times.items():
        if isinstance(label, tuple):
            continue
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) >= 4 else [min(ts), med, max(ts)]
        pairs = times.get((label, "base"))
        ratio = 1.0 if label == base else (statistics.median(t / b for t, b in zip(ts, pairs)) if pairs
                                           else med / statistics.median(times[base]))
        out[label] = {"median_ms": 1e3 * med, "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2], "ratio": ratio}
    return out


# -------------------------------------------------------------------------------------------------- FLOPs
def step_flops(trainer: Trainer, batch: dict, num_items, steps: int = 1) -> float:
    """Matmul/convolution/attention FLOPs per optimizer step (``torch.utils.flop_counter.FlopCounterMode``, mean
    over ``steps`` consecutive steps), every pass under the SDPA math kernel so attention is counted alike in every
    mode (the counter does not see the fused CPU kernels). The optimizer and elementwise work are not counted:
    the figure is the passes' arithmetic, what no implementation of a mode can avoid."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        for _ in range(steps):
            optimizer_step(trainer, batch, num_items)
    return counter.get_total_flops() / steps


# ------------------------------------------------------------------------------------------------- memory
def cpu_peak_step_bytes(step: Callable[[], None]) -> int:
    """Peak of the bytes allocated by ``step()`` on the CPU above what was live when it started, from the
    allocation/free records of ``torch.profiler`` (``profile_memory=True``) replayed in time order. Counts every
    tensor storage the step allocates (gradients, activations, backups, temporaries), nothing allocated before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def live_tensor_bytes() -> int:
    """Bytes of the distinct tensor storages reachable by the garbage collector (leak check)."""
    import gc

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj):
                s = obj.untyped_storage()
                if s.data_ptr() not in seen:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
        except Exception:  # noqa: BLE001 - some objects refuse introspection
            pass
    return total


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


# -------------------------------------------------------------------------------------------------- report
def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def git_commit() -> str:
    """Short HEAD commit, with ``+dirty`` when ``hf_gam/`` has uncommitted changes (what was measured)."""
    try:
        cwd = os.path.dirname(os.path.abspath(__file__))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd,
                              timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../hf_gam"], capture_output=True, text=True,
                               cwd=cwd, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def tmp_output_dir() -> str:
    return tempfile.mkdtemp(prefix="hf_gam_bench_")


def write_report(text: str, out: str = "", json_path: str = "", payload=None) -> None:
    """Print the markdown ``text``; write it to ``out`` and ``payload`` as JSON to ``json_path`` when given."""
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)
