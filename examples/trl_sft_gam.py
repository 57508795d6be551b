"""Supervised fine-tuning with TRL, sharpness-aware: ``hf_gam.trl.GAMSFTTrainer`` swapped for ``trl.SFTTrainer``.

    python examples/trl_sft_gam.py                                   # tiny Llama built here, offline, CPU, ~1 min
    python examples/trl_sft_gam.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara --gam_mode sam --bf16

Without ``--model`` a 2-layer Llama and a character-level tokenizer (with a chat template marking the assistant's
turns) are built in memory and trained on a small in-memory conversation set with ``assistant_only_loss``, so nothing
is downloaded. The TRL config is the user's own ``SFTConfig``; ``with_gam`` adds the ``gam_*`` values and keeps every
TRL default. TRL's per-step metrics (``num_tokens``, ``entropy``, ``mean_token_accuracy``) describe the step once,
and the log also has ``gam/grad_norm``, ``gam/ascent_grad_norm`` and ``gam/r1``.
"""

from __future__ import annotations

import argparse
import json
import os
import string

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ 'A:' + message['content'] + eos_token }}"
    "{% endgeneration %}{% else %}{{ 'U:' + message['content'] + '|' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
)
CHARS = string.ascii_lowercase + string.digits + " .,:|?!"
COLOURS = ["red", "blue", "green", "black", "white", "pink", "gold", "grey"]
THINGS = ["fox", "sky", "tea", "map", "sun", "ice", "sea", "cat"]


def char_tokenizer():
    """One token per character, built without any download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_setup(n: int = 64):
    """A 2-layer Llama, its tokenizer and a conversation dataset ("what colour is the fox?" -> "red fox")."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    rows = [[{"role": "user", "content": f"what colour is the {THINGS[i % 8]}?"},
             {"role": "assistant", "content": f"{COLOURS[(i * 3 + i // 8) % 8]} {THINGS[i % 8]}"}] for i in range(n)]
    return LlamaForCausalLM(config), tokenizer, Dataset.from_dict({"messages": rows})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hub id or a local causal LM (default: a tiny Llama built here)")
    parser.add_argument("--dataset", help="a Hub dataset TRL's SFTTrainer reads (default: an in-memory set)")
    parser.add_argument("--gam_mode", default="gam_fast", choices=["none", "sam", "gam_fast"])
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--output_dir", default="outputs/trl-sft-gam")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (TRL's default on a GPU)")
    cli = parser.parse_args(argv)

    import datasets
    from trl import SFTConfig

    from hf_gam.trl import GAMSFTTrainer, with_gam

    datasets.disable_progress_bars()
    if cli.model is None:
        model, tokenizer, train = tiny_setup()
    else:
        from transformers import AutoTokenizer

        model, tokenizer = cli.model, AutoTokenizer.from_pretrained(cli.model)
        train = datasets.load_dataset(cli.dataset or "trl-lib/Capybara", split="train")
    tiny = cli.model is None
    config = SFTConfig(  # the user's own TRL config: TRL's defaults apply to everything not set here
        output_dir=cli.output_dir, max_steps=cli.max_steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=3e-3 if tiny else 2e-5, logging_steps=10, save_strategy="no",
        report_to="none", bf16=cli.bf16, use_cpu=tiny, assistant_only_loss=tiny, disable_tqdm=True, seed=0)
    args = with_gam(config, gam_mode=cli.gam_mode, gam_rho=0.05, gam_rho_prime=0.02, gam_alpha=0.6)
    trainer = GAMSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    summary = {"gam_mode": args.gam_mode, "first_loss": logs[0]["loss"], "last_loss": logs[-1]["loss"],
               "num_tokens": logs[-1]["num_tokens"], "mean_token_accuracy": logs[-1]["mean_token_accuracy"],
               "output_dir": os.path.abspath(cli.output_dir)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
