"""Offline fixtures for the TRL tests: a character-level tokenizer built in memory (with a chat template that marks
the assistant's tokens), tiny Llama / GPT-2 models built from configs, and in-memory datasets."""

from __future__ import annotations

import string

import torch
from datasets import Dataset

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ 'A:' + message['content'] + eos_token }}"
    "{% endgeneration %}"
    "{% else %}{{ 'U:' + message['content'] + '|' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
)
CHARS = string.ascii_lowercase + string.digits + " .,:|?!"


def char_tokenizer():
    """A fast tokenizer with one token per character (``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2), built without any
    download; it carries a chat template whose assistant turns are marked for ``return_assistant_tokens_mask``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(seed=0, dtype=torch.float64, vocab_size=len(CHARS) + 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)


def tiny_gpt2(seed=0, dtype=torch.float64, vocab_size=len(CHARS) + 3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=8, n_layer=1, n_head=2, n_positions=64, pad_token_id=0,
                        eos_token_id=1, bos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).to(dtype)


def tiny_reward_model(seed=0, dtype=torch.float64, vocab_size=len(CHARS) + 3):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, num_labels=1,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForSequenceClassification(config).to(dtype)


WORDS = ["red fox", "blue sky", "green tea", "old map", "new day", "hot sun", "cold ice", "dark sea", "big cat"]


def text_data(n=5):
    """Language-modelling rows of uneven lengths."""
    return Dataset.from_dict({"text": [" ".join(WORDS[i:i + 1 + i % 3]) for i in range(n)]})


def prompt_completion_data(n=5):
    return Dataset.from_dict({"prompt": [f"q{i} {WORDS[i]}?" for i in range(n)],
                              "completion": [" " + WORDS[(i + 2) % len(WORDS)] * (1 + i % 2) for i in range(n)]})


def conversation_data(n=5):
    return Dataset.from_dict({"messages": [
        [{"role": "user", "content": f"say {WORDS[i]}"}, {"role": "assistant", "content": WORDS[(i + 1) % 9]},
         {"role": "user", "content": "again"}, {"role": "assistant", "content": WORDS[i] * (1 + i % 2)}]
        for i in range(n)]})


def preference_data(n=5):
    return Dataset.from_dict({"prompt": [f"q{i} {WORDS[i]}?" for i in range(n)],
                              "chosen": [" " + WORDS[(i + 1) % 9] * (1 + i % 2) for i in range(n)],
                              "rejected": [" " + WORDS[(i + 4) % 9] for i in range(n)]})
