"""Tiny models and datasets built in-process for the tests (no network)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import ImageClassifierOutput, SequenceClassifierOutput


class TinyConfig(PretrainedConfig):
    model_type = "hf-gam-tiny-mlp"

    def __init__(self, in_dim=6, hidden=10, num_labels=3, batchnorm=False, **kwargs):
        self.in_dim, self.hidden, self.batchnorm = in_dim, hidden, batchnorm
        super().__init__(num_labels=num_labels, **kwargs)


class TinyMLP(PreTrainedModel):
    """``in_dim -> hidden (tanh) -> num_labels``: 6*10+10+10*3+3 = 103 parameters by default (smooth, so its
    Hessian is informative everywhere). ``batchnorm=True`` adds a BatchNorm1d after the first layer."""

    config_class = TinyConfig
    main_input_name = "pixel_values"

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.fc1 = nn.Linear(config.in_dim, config.hidden)
        self.bn = nn.BatchNorm1d(config.hidden) if config.batchnorm else nn.Identity()
        self.fc2 = nn.Linear(config.hidden, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        pass  # keep PyTorch's default init (seeded by the test)

    def forward(self, pixel_values, labels=None, **kwargs):
        logits = self.fc2(torch.tanh(self.bn(self.fc1(pixel_values))))
        loss = None
        if labels is not None:
            loss = ForSequenceClassificationLoss(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits)


class TensorDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def tiny_model(seed=0, dtype=torch.float64, **config):
    torch.manual_seed(seed)
    return TinyMLP(TinyConfig(**config)).to(dtype)


def tiny_data(n=16, in_dim=6, num_labels=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g, dtype=dtype)
    y = torch.randint(0, num_labels, (n,), generator=g)
    return TensorDataset(x, y)


# ------------------------------------------------------------------- flatness diagnostics: models and model state
class LogitsMLP(nn.Module):
    """``i -> h (tanh) -> o`` returning bare logits (the flatness diagnostics must compute the cross-entropy);
    optional BatchNorm and dropout; float64 by default."""

    def __init__(self, i=5, h=20, o=4, bn=False, dropout=0.0, seed=0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(i, h), nn.Linear(h, o)
        self.bn = nn.BatchNorm1d(h) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.to(dtype)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


class LossMLP(LogitsMLP):
    """Takes ``labels`` and returns a ModelOutput with its own ``loss`` (like a Hugging Face model)."""

    def forward(self, x, labels=None):
        logits = super().forward(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def tiny_vit(seed=0, dtype=torch.float64):
    """A 1-layer, 8-wide HF ViT on 8 px images (4 px patches, 3 labels), SDPA attention, built in memory."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=16, num_labels=3)
    return ViTForImageClassification(cfg).to(dtype)


def vit_batches(n=2, size=4, seed=2, dtype=torch.float64):
    """``n`` batches of ``size`` random 8 px images with labels for :func:`tiny_vit`."""
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(size, 3, 8, 8, generator=g, dtype=dtype),
             "labels": torch.randint(0, 3, (size,), generator=g)} for _ in range(n)]


def snapshot(model):
    """Everything a diagnostic must leave as it was: weights, grads, requires_grad, buffers, modes, the RNG."""
    return {"params": [p.detach().clone() for p in model.parameters()],
            "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "buffers": [b.clone() for b in model.buffers()],
            "training": [m.training for m in model.modules()],
            "rng": torch.get_rng_state()}


def assert_unchanged(model, snap):
    """``model`` is bit for bit as :func:`snapshot` saw it."""
    now = snapshot(model)
    assert all(torch.equal(a, b) for a, b in zip(snap["params"], now["params"])), "weights changed"
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(snap["grads"], now["grads"]))
    assert snap["requires_grad"] == now["requires_grad"]
    assert all(torch.equal(a, b) for a, b in zip(snap["buffers"], now["buffers"])), "buffers changed"
    assert snap["training"] == now["training"], "train/eval modes changed"
    assert torch.equal(snap["rng"], now["rng"]), "the global RNG was used"


# Heads of transformers' classification losses: (TinyConfig kwargs, label maker(generator, n)).
HEADS = {
    "single_label": ({}, lambda g, n: torch.randint(0, 3, (n,), generator=g)),
    "ignore_index": ({}, lambda g, n: torch.where(torch.rand(n, generator=g) < 0.3, -100,
                                                  torch.randint(0, 3, (n,), generator=g))),
    "multi_label": ({"problem_type": "multi_label_classification"},
                    lambda g, n: torch.randint(0, 2, (n, 3), generator=g).double()),
    "regression": ({"num_labels": 1}, lambda g, n: torch.randn(n, generator=g, dtype=torch.float64)),
}


def head_model_and_data(head, n=12, seed=0):
    """A float64 :class:`TinyMLP` with head ``head`` (a key of :data:`HEADS`) and ``n`` samples with its labels."""
    config, make_labels = HEADS[head]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return tiny_model(seed, **config), TensorDataset(x, make_labels(g, n))


class TinyConvConfig(PretrainedConfig):
    model_type = "hf-gam-tiny-conv"

    def __init__(self, channels=4, num_labels=3, **kwargs):
        self.channels = channels
        super().__init__(num_labels=num_labels, **kwargs)


class TinyConvNet(PreTrainedModel):
    """``conv3x3 -> BatchNorm -> tanh -> conv3x3 -> mean pool -> linear`` on 3-channel images: the conv weights'
    gradients take the inputs' memory format (channels-last inputs give channels-last weight gradients)."""

    config_class = TinyConvConfig
    main_input_name = "pixel_values"

    def __init__(self, config: TinyConvConfig):
        super().__init__(config)
        c = config.channels
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, pixel_values, labels=None, **kwargs):
        x = self.conv2(torch.tanh(self.bn(self.conv1(pixel_values))))
        logits = self.head(x.mean(dim=(2, 3)))
        loss = None if labels is None else ForSequenceClassificationLoss(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits)


def tiny_conv(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return TinyConvNet(TinyConvConfig()).to(dtype)


def image_batches(n=16, size=6, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))
