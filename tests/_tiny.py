"""Tiny models and datasets built in-process for the tests (no network)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import ImageClassifierOutput


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
