"""Tiny models and data for tests, benchmarks and quick experiments (never imported by the package itself).

- :class:`TinyMLP` (config :class:`TinyMLPConfig`): a Hugging Face model (``save_pretrained``, the Trainer's
  classification / regression losses through ``config.problem_type``) of a few Linear layers with tanh, optional
  BatchNorm after the first; image inputs are flattened. Tests use ~100 parameters, the benchmarks millions.
- :class:`TensorDataset`: rows ``{"pixel_values": x[i], "labels": y[i]}`` from two tensors, as the Trainer feeds
  them to a model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import ImageClassifierOutput

__all__ = ["TinyMLP", "TinyMLPConfig", "TensorDataset"]


class TinyMLPConfig(PretrainedConfig):
    model_type = "hf-gam-tiny-mlp"

    def __init__(self, in_dim: int = 6, hidden: int | list[int] = 10, num_labels: int = 3, batchnorm: bool = False,
                 **kwargs):
        self.in_dim, self.batchnorm = in_dim, batchnorm
        self.hidden = hidden if isinstance(hidden, int) else list(hidden)
        super().__init__(num_labels=num_labels, **kwargs)


class TinyMLP(PreTrainedModel):
    """``in_dim -> hidden... (tanh) -> num_labels``: ``fc1`` (then ``bn``, a BatchNorm1d with ``batchnorm=True``),
    ``hidden_layers`` for every further width, ``fc2`` the head. The default, 6*10+10+10*3+3 = 103 parameters, is
    smooth, so its Hessian is informative everywhere. Weights keep PyTorch's default init (seed before building)."""

    config_class = TinyMLPConfig
    main_input_name = "pixel_values"

    def __init__(self, config: TinyMLPConfig):
        super().__init__(config)
        widths = [config.hidden] if isinstance(config.hidden, int) else list(config.hidden)
        self.fc1 = nn.Linear(config.in_dim, widths[0])
        self.bn = nn.BatchNorm1d(widths[0]) if config.batchnorm else nn.Identity()
        self.hidden_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.fc2 = nn.Linear(widths[-1], config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        pass  # PyTorch's default init, seeded by the caller

    def forward(self, pixel_values, labels=None, **kwargs):
        x = torch.tanh(self.bn(self.fc1(pixel_values.flatten(1))))
        for layer in self.hidden_layers:
            x = torch.tanh(layer(x))
        logits = self.fc2(x)
        loss = None if labels is None else ForSequenceClassificationLoss(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits)


class TensorDataset(torch.utils.data.Dataset):
    """Rows ``{"pixel_values": x[i], "labels": y[i]}`` of two tensors with one row per example."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}
