"""Small layers shared by the transformer backbones (Swin, SeMask, DiNAT)."""

import torch
from torch import nn

__all__ = ["DropPath", "Mlp"]


class DropPath(nn.Module):
    """Stochastic depth: zero the residual branch of a whole sample with probability ``drop_prob``
    during training (and rescale the kept ones by 1 / (1 - drop_prob)); identity in eval."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Two-layer perceptron with GELU (``fc1``, ``fc2``; the official parameter names)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def in_weight_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in the dtype of ``module``'s weights, outside any enclosing autocast (for a
    backbone's convolution on the image: in bfloat16, whose 8 significant bits round the
    normalised image by up to about one intensity level)."""
    weight = next(module.parameters())
    with torch.autocast(device_type=x.device.type, enabled=False):
        return module(x.to(weight.dtype))
