"""Sine position embedding of DETR / Mask2Former for 2-D feature maps."""

import math
from typing import Optional

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """The "Attention is all you need" sine embedding, generalised to images (DETR).

    For a feature map of size H x W the output has ``2 * num_pos_feats`` channels: the first
    ``num_pos_feats`` encode the row (y) position, the last ``num_pos_feats`` the column (x)
    position. Within each half, channel ``2k`` is ``sin(pos / T^(2k / F))`` and channel ``2k + 1``
    is ``cos(pos / T^(2k / F))`` (T = ``temperature``, F = ``num_pos_feats``).

    Positions count the non-padded pixels from 1 (a cumulative sum over ``~mask``); with
    ``normalize`` they are divided by the count of valid pixels of the row/column (+1e-6) and
    multiplied by ``scale`` (default 2*pi). The module has no parameters.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: Optional[float] = None,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: feature map [B, C, H, W]; only its batch size, spatial size and device are used.
            mask: optional bool [B, H, W], True on padded pixels.

        Returns:
            float32 tensor [B, 2 * num_pos_feats, H, W].
        """
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        exponent = 2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        dim_t = self.temperature**exponent

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave sin (even channels) and cos (odd channels)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
