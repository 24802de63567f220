"""Small layers shared by the transformer backbones (Swin, SeMask, DiNAT) and the heads."""

from typing import Optional

import torch
from detectron2.layers import Conv2d
from torch import nn
from torch.nn import functional as F

__all__ = ["DropPath", "Mlp", "PointwiseConv2d", "in_weight_dtype", "pointwise_conv2d"]


class DropPath(nn.Module):
    """Stochastic depth: zero the residual branch of a whole sample with probability ``drop_prob``
    during training (and rescale the kept ones by 1 / (1 - drop_prob)); identity in eval.

    One division of the branch by a per-sample divisor, ``1 - drop_prob`` for kept samples and
    infinity for dropped ones (one pass over the branch forward and one backward, instead of a
    multiplication and a division each): the same values as ``x / keep * mask``, signed zeros
    included (a negative value over infinity is -0, as it is times 0)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x / (keep / mask)

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


def pointwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The 1x1 convolution (stride 1, no padding, one group) of ``x`` [N, C, H, W] with
    ``weight`` [C_out, C, 1, 1] and ``bias`` [C_out], as one matrix product over the channels in
    ``x``'s own layout: an NCHW input gives an NCHW result, a channels-last one a channels-last
    result. The same sums as ``F.conv2d``; on CPU the convolution library takes an NCHW input
    with such an ambiguous-layout kernel as channels-last and converts the map there and back
    (bfloat16: about 4x the product's time)."""
    n, c, h, w = x.shape
    matrix = weight.view(weight.shape[0], c)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return F.linear(x.permute(0, 2, 3, 1), matrix, bias).permute(0, 3, 1, 2)
    x = x.contiguous().view(n, c, h * w)
    # (torch.matmul of [C_out, C] and [N, C, HW] computes the transposed product and copies its
    # result back: an extra pass over the output, and over its gradient in backward)
    if n == 1:
        first = x[0]
        out = (matrix @ first if bias is None else torch.addmm(bias[:, None], matrix, first))[None]
    elif bias is None:
        out = torch.bmm(matrix.expand(n, -1, -1), x)
    else:
        out = torch.baddbmm(bias[None, :, None], matrix.expand(n, -1, -1), x)
    return out.view(n, -1, h, w)


class PointwiseConv2d(Conv2d):
    """Detectron2's ``Conv2d`` (optional ``norm`` then ``activation``) with a 1x1 kernel,
    computed by :func:`pointwise_conv2d`; the parameters (``weight`` [C_out, C_in, 1, 1],
    ``bias``, ``norm.*``) are those of the convolution it replaces."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pointwise_conv2d(x, self.weight, self.bias)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x
