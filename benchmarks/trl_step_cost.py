"""Cost of a sharpness-aware step inside TRL's trainers, on CPU: SFT's ``sam`` and ``gam_fast`` steps over the plain
``SFTTrainer`` step, and DPO's with the reference log-probabilities computed once per micro-batch (what
``hf_gam.trl.GAMDPOTrainer`` does) versus recomputed in every pass (TRL's loss as it is), over the plain
``DPOTrainer`` step.

Every trainer is built the way a user builds it (TRL's config with TRL's defaults, ``with_gam`` for the ``gam_*``
values), on the same tiny Llama (a copy per trainer, same initial weights) and the same collated batch; a step is
what the Trainer's loop does (``training_step`` + ``optimizer.step()`` (SGD) + ``zero_grad``), timed round-robin in
one process with each step paired with a plain step of the same TRL trainer right before it (``_common``). Gradient
checkpointing is off (``Trainer.train()`` is what would switch TRL's default on). Expected from the passes: SFT
``sam`` 2x, ``gam_fast`` 4x; a DPO step is a policy forward+backward (3 forward-units) plus a reference forward (1),
so ``gam_fast`` costs 4·3 + 1 = 13 units with the reference reused (3.25x) and 4·(3 + 1) = 16 recomputed (4x).

    python benchmarks/trl_step_cost.py            # the table in benchmarks/results/trl_step_cost_cpu.md
    python benchmarks/trl_step_cost.py --tiny     # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import os
import string
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import git_commit, machine_line, optimizer_step, summarize, tmp_output_dir, write_report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "trl_step_cost_cpu.md")
CHARS = string.ascii_lowercase + string.digits + " .,:|?!"
WORDS = ["red fox", "blue sky", "green tea", "old map", "new day", "hot sun", "cold ice", "dark sea", "big cat"]


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(CHARS) + 3, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=None))


def datasets_for(rows: int):
    from datasets import Dataset

    words = [WORDS[i % 9] + " " + WORDS[(i * 4) % 9] for i in range(rows)]
    sft = Dataset.from_dict({"text": [" ".join(words[i:i + 4]) for i in range(rows)]})
    dpo = Dataset.from_dict({"prompt": [f"say {w}?" for w in words],
                             "chosen": [" " + " ".join(words[i:i + 3]) for i in range(rows)],
                             "rejected": [" " + words[(i + 5) % rows] for i in range(rows)]})
    return sft, dpo


def build(kind: str, label: str, model, data, tokenizer, batch_size: int):
    """A TRL trainer as a user builds it, with an optimizer, ready for :func:`_common.optimizer_step`."""
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from hf_gam.trl import GAMDPOTrainer, GAMSFTTrainer, with_gam

    config_cls, plain_cls, gam_cls = ((SFTConfig, SFTTrainer, GAMSFTTrainer) if kind == "sft"
                                      else (DPOConfig, DPOTrainer, GAMDPOTrainer))
    args = config_cls(output_dir=tmp_output_dir(), per_device_train_batch_size=batch_size, learning_rate=1e-3,
                      optim="sgd", use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True,
                      seed=0)
    extra = {"ref_model": copy.deepcopy(model)} if kind == "dpo" else {}
    if label.endswith("(plain)"):
        trainer = plain_cls(model=model, args=args, train_dataset=data, processing_class=tokenizer, **extra)
    else:
        cls = gam_cls
        if "per pass" in label:
            cls = type("PerPass", (gam_cls,), {"gam_reuse_ref_log_probs": False})
        trainer = cls(model=model, args=with_gam(args, gam_mode=label.split()[0]), train_dataset=data,
                      processing_class=tokenizer, **extra)
    trainer.remove_callback(PrinterCallback)
    trainer.current_gradient_accumulation_steps = 1
    trainer.create_optimizer()
    return trainer


def timed_rounds(trainers: dict, batch: dict, num_items, rounds: int, warmup: int, clock) -> dict:
    """Round-robin, each step paired with a plain step right before it (the format of ``_common.summarize``)."""
    base, labels = next(iter(trainers)), list(trainers)[1:]
    times: dict = {label: [] for label in trainers}

    def timed(label):
        t0 = clock()
        optimizer_step(trainers[label], batch, num_items)
        return clock() - t0

    for r in range(warmup + rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            t_base, t = timed(base), timed(label)
            if r >= warmup:
                times[base].append(t_base)
                times[label].append(t)
                times.setdefault((label, "base"), []).append(t_base)
    return times


CASES = {
    "sft": ["SFTTrainer (plain)", "sam", "gam_fast"],
    "dpo": ["DPOTrainer (plain)", "sam (reference reused)", "sam (reference per pass)",
            "gam_fast (reference reused)", "gam_fast (reference per pass)"],
}
EXPECTED = {"sam": 2.0, "gam_fast": 4.0, "sam (reference reused)": 7 / 4, "sam (reference per pass)": 2.0,
            "gam_fast (reference reused)": 13 / 4, "gam_fast (reference per pass)": 4.0}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke run: small model, 2 rounds")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--out", default=None, help=f"markdown report (default {DEFAULT_OUT}; none with --tiny)")
    cli = parser.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    hidden, layers, batch_size, rounds = (16, 1, 2, 2) if cli.tiny else (64, 2, 8, cli.rounds)
    clock = time.process_time if cli.clock == "cpu" else time.perf_counter
    tokenizer, (sft_data, dpo_data), model = char_tokenizer(), datasets_for(4 * batch_size), llama(hidden, layers)
    results, lines = {}, []
    for kind, data in (("sft", sft_data), ("dpo", dpo_data)):
        trainers = {label: build(kind, label, copy.deepcopy(model), data, tokenizer, batch_size)
                    for label in CASES[kind]}
        first = next(iter(trainers.values()))
        batch = first._prepare_inputs(next(iter(first.get_train_dataloader())))
        num_items = batch["labels"][..., 1:].ne(-100).sum() if kind == "sft" else None
        results[kind] = summarize(timed_rounds(trainers, batch, num_items, rounds, 1 if cli.tiny else 2, clock),
                                  base=CASES[kind][0])
    n_params = sum(p.numel() for p in model.parameters())
    lines += [f"# TRL step cost on CPU ({cli.clock} time)", "",
              f"Machine: {machine_line()}; hf_gam commit {git_commit()}; {rounds} interleaved rounds; median per "
              f"optimizer step; ratio: median over rounds of the step over the plain TRL trainer's step run right "
              f"before it. Model: Llama, {layers} layers, hidden {hidden}, {n_params:,} parameters, batch "
              f"{batch_size} (DPO: {batch_size} pairs), SGD, float32, gradient checkpointing off.", "",
              "| trainer | step | ms | ratio | expected from the passes |", "|---|---|---:|---:|---:|"]
    for kind in ("sft", "dpo"):
        for label, row in results[kind].items():
            expected = EXPECTED.get(label)
            lines.append(f"| {kind.upper()} | {label} | {row['median_ms']:.1f} | {row['ratio']:.3f}x | "
                         f"{'' if expected is None else f'{expected:.2f}x'} |")
    dpo = results["dpo"]
    for mode in ("sam", "gam_fast"):
        saved = dpo[f"{mode} (reference per pass)"]["ratio"] / dpo[f"{mode} (reference reused)"]["ratio"]
        lines.append(f"\nDPO `{mode}`: recomputing the reference in every pass costs {saved:.3f}x the step that "
                     f"reuses it.")
    out = None if cli.tiny and cli.out is None else (cli.out or DEFAULT_OUT)
    write_report("\n".join(lines) + "\n", out or "", (out or "").replace(".md", ".json") if out else "", results)
    return results


if __name__ == "__main__":
    main()
