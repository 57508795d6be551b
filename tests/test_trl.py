"""TRL's SFT, DPO and reward trainers made sharpness-aware (``hf_gam.trl``), checked against the plain TRL trainers
(bit for bit where the step is the same) and against float64 references of each trainer's loss
(``trl_reference.py`` + ``reference.direction``), with accumulation 2 and uneven micro-batches (3 + 2 rows)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
import datasets  # noqa: E402
from transformers import HfArgumentParser, TrainingArguments  # noqa: E402
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer  # noqa: E402

from hf_gam import GAMConfig, GAMTrainer  # noqa: E402
from hf_gam.errors import UserError  # noqa: E402
from hf_gam.trl import (GAMDPOConfig, GAMDPOTrainer, GAMRewardConfig, GAMRewardTrainer, GAMSFTConfig,  # noqa: E402
                        GAMSFTTrainer, gam_config_class, with_gam)
from reference import direction, flat_params  # noqa: E402
from testing_utils import HP, assert_rel, ref_kwargs  # noqa: E402
from trl_reference import dpo_loss_of, reward_loss_of, sft_loss_of, shifted_targets  # noqa: E402
from trl_utils import (char_tokenizer, conversation_data, preference_data, prompt_completion_data,  # noqa: E402
                       text_data, tiny_llama, tiny_reward_model)

datasets.disable_progress_bars()
warnings.filterwarnings("ignore", category=FutureWarning)

STEP = dict(use_cpu=True, bf16=False, report_to="none", max_steps=1, per_device_train_batch_size=3,
            gradient_accumulation_steps=2, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
            max_grad_norm=0.0, weight_decay=0.0, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
KINDS = {  # plain TRL trainer, ours, TRL's config, model, data
    "sft": (SFTTrainer, GAMSFTTrainer, SFTConfig, tiny_llama, text_data),
    "dpo": (DPOTrainer, GAMDPOTrainer, DPOConfig, tiny_llama, preference_data),
    "reward": (RewardTrainer, GAMRewardTrainer, RewardConfig, tiny_reward_model, preference_data),
}
TOKENIZER = char_tokenizer()
_PLAIN: dict = {}


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """The configs' relative output dirs ("o") land in the test's temporary directory."""
    monkeypatch.chdir(tmp_path)


def recording(cls):
    """``cls`` keeping the micro-batches the Trainer fed to ``training_step``."""
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", []) + [dict(inputs)]
        return cls.training_step(self, model, inputs, num_items_in_batch)

    return type(f"Recording{cls.__name__}", (cls,), {"training_step": training_step})


def train(kind, cls, args, *, data=None, model=None, **kw):
    """One optimizer step of ``cls``; returns ``(trainer, θ0, θ1)``."""
    _, _, _, make_model, make_data = KINDS[kind]
    model = model if model is not None else make_model()
    if kind == "dpo" and "ref_model" not in kw:
        kw["ref_model"] = tiny_llama(seed=1)  # a reference unlike the policy: the log-ratios are not zero
    theta0 = flat_params(model)
    trainer = recording(cls)(model=model, args=args, train_dataset=data or make_data(), processing_class=TOKENIZER,
                             **kw)
    trainer.train()
    return trainer, theta0, flat_params(model)


def plain(kind):
    """The plain TRL trainer's step (cached: several tests compare with it)."""
    if kind not in _PLAIN:
        plain_cls, _, config_cls, _, _ = KINDS[kind]
        _PLAIN[kind] = train(kind, plain_cls, config_cls(output_dir="unused", **STEP))
    return _PLAIN[kind]


def trl_metrics(trainer):
    """What TRL logged in the first step, the GAM figures and timings left out."""
    logs = trainer.state.log_history[0]
    return {k: v for k, v in logs.items() if not k.startswith(("gam/", "grad_norm")) and k != "loss"}


def reference_step(kind, trainer, theta0, args):
    """``θ0 - Σ w_i d_i`` in float64: ``d_i`` the mode's direction on micro-batch ``i``'s loss, ``w_i`` its share
    of the trainer's objective (SFT: its scored tokens over the window's; DPO and reward: 1 / accumulation steps). With
    ``gam_perturbation="global"``: ``θ0 - d`` with ``d`` the direction on the window's mean loss (over tokens for
    SFT, over pairs for DPO and reward), whatever the split."""
    model, batches = KINDS[kind][3](), trainer.seen
    if kind == "sft":
        counts = [shifted_targets(b).ne(-100).sum().double() for b in batches]
        losses = [sft_loss_of(model, b) for b in batches]
    else:
        counts = [torch.tensor(len(b["input_ids"]) / 2, dtype=torch.float64) for b in batches]
        losses = [dpo_loss_of(model, tiny_llama(seed=1), b, beta=args.beta) if kind == "dpo"
                  else reward_loss_of(model, b) for b in batches]
    if args.gam_perturbation == "global":
        def window_loss(theta):
            return sum(c * L(theta) for c, L in zip(counts, losses)) / sum(counts)

        return theta0 - direction(args.gam_mode, window_loss, theta0, **ref_kwargs(args))
    weights = [c / sum(counts) for c in counts] if kind == "sft" else [1 / len(batches)] * len(batches)
    step = sum(w * direction(args.gam_mode, L, theta0, **ref_kwargs(args)) for w, L in zip(weights, losses))
    return theta0 - step


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("config_cls", [SFTConfig, DPOConfig, RewardConfig])
def test_gam_configs_keep_trl_defaults(config_cls):
    """``gam_config_class(C)``, a hand-written ``@dataclass class X(GAMConfig, C)`` and ``with_gam(C(...))`` keep
    every default and value of TRL's config (``bf16``, ``gradient_checkpointing``, ``learning_rate``,
    ``logging_steps`` differ from ``TrainingArguments``'), parse with ``HfArgumentParser`` and pickle."""

    @dataclasses.dataclass
    class HandWritten(GAMConfig, config_cls):
        pass

    def values(config):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config_cls) if f.init}

    shipped = {SFTConfig: GAMSFTConfig, DPOConfig: GAMDPOConfig, RewardConfig: GAMRewardConfig}[config_cls]
    assert gam_config_class(config_cls) is shipped
    theirs = config_cls(output_dir="o", use_cpu=True)
    for combined in (gam_config_class(config_cls)(output_dir="o", use_cpu=True),
                     HandWritten(output_dir="o", use_cpu=True), with_gam(theirs)):
        assert isinstance(combined, config_cls) and isinstance(combined, GAMConfig)
        assert values(combined) == values(theirs)
        assert (combined.gam_mode, combined.gam_rho) == ("gam_fast", 0.2)
    assert HandWritten(output_dir="o", use_cpu=True).learning_rate != TrainingArguments(output_dir="o").learning_rate
    parsed, = HfArgumentParser(gam_config_class(config_cls)).parse_args_into_dataclasses(
        ["--output_dir", "o", "--use_cpu", "true", "--gam_mode", "sam", "--learning_rate", "0.5"])
    assert (parsed.gam_mode, parsed.learning_rate, parsed.bf16) == ("sam", 0.5, theirs.bf16)
    restored = pickle.loads(pickle.dumps(with_gam(theirs, gam_mode="sam", sam_rho=0.1)))
    assert type(restored) is gam_config_class(config_cls) and (restored.gam_mode, restored.sam_rho) == ("sam", 0.1)
    with pytest.raises(TypeError, match="gam_moed"):
        with_gam(theirs, gam_moed="sam")


def test_users_own_trl_config_unchanged():
    """The user's own ``SFTConfig`` trains in the default mode with every value kept; plain ``TrainingArguments``
    become an ``SFTConfig`` as TRL converts them; a ``GAMConfig`` keeps its ``gam_*`` values."""
    theirs = SFTConfig(output_dir="o", max_length=64, **STEP)
    trainer = GAMSFTTrainer(model=tiny_llama(), args=theirs, train_dataset=text_data(), processing_class=TOKENIZER)
    assert isinstance(trainer.args, SFTConfig) and trainer.args.gam_mode == "gam_fast"
    assert all(getattr(trainer.args, f.name) == getattr(theirs, f.name) for f in dataclasses.fields(SFTConfig)
               if f.init and f.name != "gradient_checkpointing_kwargs")
    stock = dict(STEP, learning_rate=0.25)
    trainer = GAMSFTTrainer(tiny_llama(), TrainingArguments(output_dir="o", **stock), train_dataset=text_data(),
                            processing_class=TOKENIZER)
    assert isinstance(trainer.args, SFTConfig) and trainer.args.learning_rate == 0.25
    trainer = GAMSFTTrainer(tiny_llama(), GAMConfig(output_dir="o", gam_mode="sam", sam_rho=0.07, **STEP),
                            train_dataset=text_data(), processing_class=TOKENIZER)
    assert isinstance(trainer.args, GAMSFTConfig) and (trainer.args.gam_mode, trainer.args.sam_rho) == ("sam", 0.07)


# ----------------------------------------------------------------------------- against the plain trainers
@pytest.mark.parametrize("kind", list(KINDS))
def test_none_and_sam_rho0_equal_plain_trainer(kind):
    """``gam_mode="none"`` is the plain TRL step bit for bit; ``sam`` with ρ = 0 is the same step (up to the
    round-off of TRL's fused LM head, which accumulates in float32), and logs TRL's metrics once per micro-batch:
    every one equal to the plain trainer's (``num_tokens`` was 2x before)."""
    _, ours, config_cls, _, _ = KINDS[kind]
    reference, theta0, theta_plain = plain(kind)
    none, _, theta_none = train(kind, ours, with_gam(config_cls(output_dir="o", **STEP), gam_mode="none"))
    assert torch.equal(theta_none, theta_plain)
    assert trl_metrics(none) == trl_metrics(reference)
    sam, _, theta_sam = train(kind, ours, with_gam(config_cls(output_dir="o", **STEP), gam_mode="sam", sam_rho=0.0))
    assert_rel(theta_sam - theta0, theta_plain - theta0, tol=1e-6)
    assert trl_metrics(sam) == trl_metrics(reference)
    assert sam.state.log_history[0]["loss"] == pytest.approx(reference.state.log_history[0]["loss"], rel=1e-6)


@pytest.mark.parametrize("mode", ["sam", "gam_fast"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_step_equals_float64_reference(kind, mode):
    """One step of ``sam`` / ``gam_fast`` with accumulation 2 over micro-batches of 3 and 2 rows equals the float64
    reference of that trainer's loss; TRL's metrics come from the clean pass only (equal to the plain trainer's)."""
    _, ours, config_cls, _, _ = KINDS[kind]
    args = with_gam(config_cls(output_dir="o", **STEP), gam_mode=mode, **HP)
    trainer, theta0, theta1 = train(kind, ours, args)
    assert [len(b["input_ids"]) for b in trainer.seen] == ([3, 2] if kind == "sft" else [6, 4])
    assert_rel(theta1, reference_step(kind, trainer, theta0, args), tol=1e-6 if kind == "reward" else 2e-6)
    assert trl_metrics(trainer) == trl_metrics(plain(kind)[0])


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_global_perturbation_equals_float64_reference(kind):
    """``gam_perturbation="global"``: every pass over the whole window, the direction of the window's mean loss."""
    _, ours, config_cls, _, _ = KINDS[kind]
    args = with_gam(config_cls(output_dir="o", **STEP), gam_mode="gam_fast", gam_perturbation="global", **HP)
    trainer, theta0, theta1 = train(kind, ours, args)
    assert_rel(theta1, reference_step(kind, trainer, theta0, args), tol=2e-6)
    assert trl_metrics(trainer) == trl_metrics(plain(kind)[0])


@pytest.mark.parametrize("variant", ["completion_only", "assistant_only", "padding_free"])
def test_sft_masks_and_padding_free(variant):
    """SFT's completion-only and assistant-only masks and padding-free batches: one ``gam_fast`` step equals the
    float64 reference over exactly the tokens TRL scores."""
    data = {"completion_only": prompt_completion_data(), "assistant_only": conversation_data(),
            "padding_free": text_data()}[variant]
    extra = {"assistant_only": dict(assistant_only_loss=True),
             "padding_free": dict(padding_free=True, max_length=None)}.get(variant, {})
    args = with_gam(SFTConfig(output_dir="o", **STEP, **extra), gam_mode="gam_fast", **HP)
    trainer, theta0, theta1 = train("sft", GAMSFTTrainer, args, data=data)
    batch = trainer.seen[0]
    if variant == "padding_free":
        assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch and "attention_mask" not in batch
    else:  # some tokens of real text are not scored
        assert (batch["labels"].eq(-100) & batch["attention_mask"].bool()).any()
    assert_rel(theta1, reference_step("sft", trainer, theta0, args), tol=2e-6)


# -------------------------------------------------------------------------------------------------- DPO
def test_dpo_reference_log_probs_once_per_micro_batch_and_fixed():
    """The reference model runs once per micro-batch (not once per pass), never changes, and the step is bit for
    bit the one with the reference recomputed in every pass (TRL's loss as it is)."""
    args = with_gam(DPOConfig(output_dir="o", **STEP), gam_mode="gam_fast", **HP)
    results = {}
    for reuse in (True, False):
        reference_model = tiny_llama(seed=1)
        before = copy.deepcopy(reference_model.state_dict())
        calls = []
        reference_model.register_forward_hook(lambda *_: calls.append(1))
        cls = type("DPO", (GAMDPOTrainer,), {"gam_reuse_ref_log_probs": reuse})
        _, _, theta1 = train("dpo", cls, args, ref_model=reference_model)
        assert all(torch.equal(v, reference_model.state_dict()[k]) for k, v in before.items())
        results[reuse] = (len(calls), theta1)
    assert results[True][0] == 2 and results[False][0] == 2 * 4  # 2 micro-batches, 4 passes of gam_fast
    assert torch.equal(results[True][1], results[False][1])


def test_dpo_precomputed_reference_log_probs():
    """With TRL's ``precompute_ref_log_probs=True`` the reference runs before training only; the step is unchanged."""
    reference_model = tiny_llama(seed=1)
    calls = []
    reference_model.register_forward_hook(lambda *_: calls.append(1))
    args = with_gam(DPOConfig(output_dir="o", precompute_ref_log_probs=True, **STEP), gam_mode="gam_fast", **HP)
    trainer = recording(GAMDPOTrainer)(model=tiny_llama(), ref_model=reference_model, args=args,
                                       train_dataset=preference_data(), processing_class=TOKENIZER)
    before, theta0 = len(calls), flat_params(trainer.model)
    trainer.train()
    assert before > 0 and len(calls) == before
    assert_rel(flat_params(trainer.model), reference_step("dpo", trainer, theta0, args), tol=2e-6)


# ------------------------------------------------------------------------------------------ refusals
def test_generating_trainers_refused():
    from trl import GRPOTrainer, RLOOTrainer

    for generating in (GRPOTrainer, RLOOTrainer):
        mixed = type(f"GAM{generating.__name__}", (GAMTrainer, generating), {})
        with pytest.raises(UserError, match=f"{generating.__name__}: it generates completions inside"):
            mixed(model=tiny_llama(), args=None, train_dataset=text_data())


@pytest.mark.parametrize("kind,mode", [("sft", "gam"), ("dpo", "gnp"), ("sft", "gam_sam")])
def test_exact_hvp_modes_refused_through_fused_head(kind, mode):
    _, ours, config_cls, _, _ = KINDS[kind]
    with pytest.raises(UserError, match=f"gam_mode='{mode}'.*fused LM head.*double backward"):
        ours(model=tiny_llama(), args=with_gam(config_cls(output_dir="o", **STEP), gam_mode=mode),
             train_dataset=preference_data() if kind == "dpo" else text_data(), processing_class=TOKENIZER)


# ------------------------------------------------------------------------------------------------ PEFT
@pytest.mark.parametrize("kind,mode", [("sft", "sam"), ("sft", "gam_fast"), ("dpo", "gam_fast")])
def test_peft_lora_trains_with_base_model_bit_identical(kind, mode):
    """LoRA adapters (TRL's ``peft_config``) train in ``sam`` / ``gam_fast``; every base weight stays bit for bit
    (DPO's reference is then the base model, adapters disabled)."""
    from peft import LoraConfig

    model = tiny_llama(dtype=torch.float32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    _, ours, config_cls, _, _ = KINDS[kind]
    args = with_gam(config_cls(output_dir="o", **dict(STEP, learning_rate=0.1)), gam_mode=mode, **HP)
    trainer = ours(model=model, args=args, train_dataset=KINDS[kind][4](), processing_class=TOKENIZER,
                   peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    adapters = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = {n: p.detach() for n, p in trainer.model.named_parameters()}
    assert adapters and all("lora_" in n for n in adapters)
    assert all(not torch.equal(adapters[n], after[n]) for n in adapters)
    state = trainer.model.get_base_model().state_dict()
    for key, value in base.items():
        weight = state.get(key, state.get(key.replace(".weight", ".base_layer.weight")))
        assert torch.equal(weight, value), key


# ---------------------------------------------------------------------------------------- hand-written
def test_hand_written_mix_is_the_shipped_class():
    """``class C(GAMTrainer, SFTTrainer)`` written by hand with the user's own ``SFTConfig`` trains exactly as
    ``hf_gam.trl.GAMSFTTrainer``, TRL's metrics once per micro-batch included."""

    class HandWritten(GAMTrainer, SFTTrainer):
        pass

    args = SFTConfig(output_dir="o", **STEP)
    ours, _, theta_ours = train("sft", GAMSFTTrainer, args)
    theirs, _, theta_theirs = train("sft", HandWritten, args)
    assert isinstance(theirs.args, GAMConfig) and theirs.args.gam_mode == "gam_fast"
    assert torch.equal(theta_ours, theta_theirs)
    assert trl_metrics(theirs) == trl_metrics(ours) == trl_metrics(plain("sft")[0])


# ------------------------------------------------------------------------------ optional extra, example
def test_hf_gam_does_not_need_trl(tmp_path):
    """``import hf_gam`` and a stock ``GAMTrainer`` neither need nor load trl; ``hf_gam.trl`` without trl says what
    to install."""
    code = """
import sys
import hf_gam
from hf_gam import GAMConfig, GAMTrainer
assert "trl" not in sys.modules, "import hf_gam loaded trl"
sys.modules["trl"] = None  # as if trl were not installed
from testing_utils import tiny_data, tiny_model
args = GAMConfig(output_dir="o", use_cpu=True, report_to="none")
GAMTrainer(model=tiny_model(), args=args, train_dataset=tiny_data())
try:
    import hf_gam.trl
except ImportError as error:
    assert "pip install 'hf_gam[trl]'" in str(error), error
else:
    raise AssertionError("hf_gam.trl imported without trl")
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(Path(__file__).parents[1]), str(Path(__file__).parent)])})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_example_trl_sft_gam_runs(tmp_path):
    """``examples/trl_sft_gam.py`` trains the tiny Llama offline (assistant-only loss, ``gam_fast``) and saves it."""
    script = Path(__file__).parents[1] / "examples" / "trl_sft_gam.py"
    done = subprocess.run([sys.executable, str(script), "--max_steps", "10", "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["gam_mode"] == "gam_fast" and math.isfinite(summary["last_loss"]) and summary["num_tokens"] > 0
    assert (tmp_path / "model.safetensors").is_file()


def test_trl_step_cost_benchmark_tiny(tmp_path):
    """``benchmarks/trl_step_cost.py --tiny`` runs every case and writes its table (no timing is asserted)."""
    import importlib.util

    root = Path(__file__).parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_trl_step_cost", root / "benchmarks" / "trl_step_cost.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--tiny", "--out", str(tmp_path / "trl.md")])
    finally:
        torch.set_num_threads(threads)
    text = (tmp_path / "trl.md").read_text()
    for kind, labels in bench.CASES.items():
        assert results[kind][labels[0]]["ratio"] == 1.0
        assert all(f"| {label} |" in text for label in labels)


def test_checkpoints_resume_and_trl_model_card(tmp_path):
    """Checkpoints hold the combined config (pickled), resuming from one reproduces the uninterrupted run bit for bit,
    and the card TRL writes at every checkpoint is TRL's (a language model's), tagged with the mode."""
    step = dict(STEP, max_steps=3, save_strategy="steps", save_steps=1, gradient_accumulation_steps=1)
    args = with_gam(SFTConfig(output_dir=str(tmp_path), **step), gam_mode="gam_fast", **HP)
    _, _, theta_full = train("sft", GAMSFTTrainer, args)
    saved = torch.load(tmp_path / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert type(saved) is GAMSFTConfig and (saved.gam_mode, saved.gam_rho) == ("gam_fast", HP["gam_rho"])
    card = (tmp_path / "README.md").read_text()
    assert "- trl" in card and "- hf-gam" in card and "gam_mode-gam_fast" in card and "image-classification" not in card
    model = tiny_llama()
    resumed = GAMSFTTrainer(model=model, args=args, train_dataset=text_data(), processing_class=TOKENIZER)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert torch.equal(flat_params(model), theta_full)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_sft_and_dpo(tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo, CPU): one ``gam_fast`` step of SFT and of DPO; the ranks end
    bit-identical, the step equals the float64 reference over both ranks' micro-batches (SFT: weighted by tokens over
    both, DPO: their mean), and TRL's ``num_tokens`` counts both ranks' tokens once (its collectives ran in every
    pass on both ranks, in step)."""
    from test_distributed import torchrun

    torchrun("trl_ddp_step.py", str(tmp_path), timeout=900)
    ranks = [torch.load(tmp_path / f"trl_rank{r}.pt", weights_only=False) for r in range(2)]
    args = with_gam(SFTConfig(output_dir="o", **STEP), gam_mode="gam_fast", **HP)
    for kind in ("sft", "dpo"):
        r0, r1 = ranks[0][kind], ranks[1][kind]
        assert r0["world"] == 2 and torch.equal(r0["theta1"], r1["theta1"]), "ranks diverged"
        batches = r0["seen"] + r1["seen"]
        trainer = type("Seen", (), {"seen": batches})()
        dpo_args = with_gam(DPOConfig(output_dir="o", **STEP), gam_mode="gam_fast", **HP)
        expected = reference_step(kind, trainer, r0["theta0"], args if kind == "sft" else dpo_args)
        assert_rel(r0["theta1"], expected, tol=2e-6)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        assert r0["logs"][0]["num_tokens"] == r1["logs"][0]["num_tokens"] == tokens


def test_reward_exact_hvp_mode_equals_float64_reference():
    """The reward model (no fused head) runs the exact-HVP modes: one ``gnp`` step with accumulation 2 over uneven
    micro-batches equals the float64 reference with explicit Hessians (TRL's default gradient checkpointing on)."""
    args = with_gam(RewardConfig(output_dir="o", **STEP), gam_mode="gnp", **HP)
    trainer, theta0, theta1 = train("reward", GAMRewardTrainer, args)
    assert trainer.args.gradient_checkpointing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):  # explicit Hessians need attention's double backward
        expected = reference_step("reward", trainer, theta0, args)
    assert_rel(theta1, expected, tol=1e-6)
