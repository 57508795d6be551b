"""Float64 references of TRL's losses as functions of the flat trainable parameters, written from TRL's documented
objectives (not from its code): SFT's token-mean negative log-likelihood over the shifted labels, DPO's sigmoid loss
on the policy / reference log-ratios, the reward model's pairwise log-sigmoid loss. With ``reference.direction`` they
give the step a GAM / SAM mode must take on a micro-batch. Nothing here imports hf_gam or trl."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k", "seq_idx")


def _functional(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]

    def call(theta, **kwargs):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[i:i + s.numel()].view(s)
            i += s.numel()
        return functional_call(model, params, (), kwargs)

    return call


def _forward_kwargs(batch):
    """The batch's model inputs, with ``use_cache=False`` as TRL passes it (with a cache, transformers does not build
    the block-diagonal mask of a padding-free batch from its ``position_ids``: its sequences would see each other)."""
    return {**{k: batch[k] for k in FORWARD_KEYS if k in batch}, "use_cache": False}


def shifted_targets(batch):
    """The next-token targets a causal LM's loss scores: ``shift_labels`` or ``labels[:, 1:]`` (-100: not scored)."""
    return batch["shift_labels"] if "shift_labels" in batch else batch["labels"][:, 1:]


def _token_logps(logits, targets):
    logp = F.log_softmax(logits.double(), dim=-1)
    return logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * targets.ne(-100)


def sft_loss_of(model, batch):
    """``L(θ)`` of SFT: ``-Σ log p(target) / #targets`` over the scored shifted targets of ``batch``."""
    call, targets = _functional(model), shifted_targets(batch)

    def L(theta):
        logits = call(theta, **_forward_kwargs(batch)).logits
        logits = logits if "shift_labels" in batch else logits[:, :-1]
        return -_token_logps(logits, targets).sum() / targets.ne(-100).sum()

    return L


def sequence_logps(model, theta, batch, call=None):
    """Per-row sum of completion-token log-probabilities (``completion_mask`` marks the completion)."""
    call = call or _functional(model)
    targets = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
    logits = call(theta, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False).logits[:, :-1]
    return _token_logps(logits, targets).sum(-1)


def dpo_loss_of(model, reference_model, batch, beta):
    """``L(θ)`` of DPO (sigmoid loss): mean over pairs of ``-log σ(β((πc - rc) - (πr - rr)))``; rows are
    ``[chosen..., rejected...]``; the reference log-probabilities come from ``reference_model`` (fixed)."""
    from reference import flat_params

    call = _functional(model)
    with torch.no_grad():
        ref = sequence_logps(reference_model, flat_params(reference_model), batch)
    ref_chosen, ref_rejected = ref.chunk(2)

    def L(theta):
        chosen, rejected = sequence_logps(model, theta, batch, call).chunk(2)
        return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()

    return L


def reward_loss_of(model, batch):
    """``L(θ)`` of reward modelling: mean over pairs of ``-log σ(r_chosen - r_rejected)``."""
    call = _functional(model)

    def L(theta):
        rewards = call(theta, **_forward_kwargs(batch)).logits.squeeze(-1).double()
        chosen, rejected = rewards.chunk(2)
        return -F.logsigmoid(chosen - rejected).mean()

    return L
