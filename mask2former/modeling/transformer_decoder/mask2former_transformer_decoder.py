"""The masked-attention multi-scale transformer decoder of Mask2Former (Cheng et al., 2022).

Module and parameter names follow the official implementation, so official checkpoints load
unchanged (``transformer_self_attention_layers.{i}.self_attn``,
``transformer_cross_attention_layers.{i}.multihead_attn``, ``transformer_ffn_layers.{i}.linear1``,
``decoder_norm``, ``query_feat``, ``query_embed``, ``level_embed``, ``input_proj.{l}``,
``class_embed``, ``mask_embed.layers.{k}``).
"""

from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from torch import nn
from torch.nn import functional as F

from ..layers import PointwiseConv2d
from ..point_sampling import resize_bilinear
from ..position_encoding import PositionEmbeddingSine
from .mask_product import mask_logits
from .registry import TRANSFORMER_DECODER_REGISTRY


class _ResidualBlock(nn.Module):
    """A residual branch with a LayerNorm, either before the branch (pre-norm) or after the sum."""

    def __init__(self, d_model: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _xavier_init(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _residual(self, tgt: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]):
        if self.normalize_before:
            return tgt + self.dropout(branch(self.norm(tgt)))
        return self.norm(tgt + self.dropout(branch(tgt)))


def multi_head_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """
    The computation of ``attn`` (an ``nn.MultiheadAttention`` with equal query/key/value widths
    and biases) on batch-first inputs, with an attention mask shared by all heads.

    ``nn.MultiheadAttention`` needs the mask repeated per head ([B * heads, L, S]) and turns it
    into an additive float mask of that size; here it is broadcast over the heads instead.

    Args:
        attn: holds the parameters (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) and the
            attention dropout.
        query: [B, L, E]; key, value: [B, S, E].
        attn_mask: bool [B, L, S], True where attention is blocked (MultiheadAttention's
            convention), or None.

    Returns:
        [B, L, E]
    """
    batch, num_q, dim = query.shape
    heads = attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).view(batch, num_q, heads, -1).transpose(1, 2)
    k = F.linear(key, w_k, b_k).view(batch, key.shape[1], heads, -1).transpose(1, 2)
    v = F.linear(value, w_v, b_v).view(batch, value.shape[1], heads, -1).transpose(1, 2)
    allowed = None if attn_mask is None else ~attn_mask[:, None]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, dropout_p=attn.dropout if attn.training else 0.0
    )
    return attn.out_proj(out.transpose(1, 2).reshape(batch, num_q, dim))


class SelfAttentionLayer(_ResidualBlock):
    """Self-attention among the queries; queries and keys get the query position embedding."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before=False):
        super().__init__(d_model, dropout, normalize_before)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self._xavier_init()

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """tgt, query_pos: [B, Q, C]."""

        def attend(x):
            q = x + query_pos
            return multi_head_attention(self.self_attn, q, q, x)

        return self._residual(tgt, attend)


class CrossAttentionLayer(_ResidualBlock):
    """Queries attend to the flattened pixel features of one scale, optionally masked."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before=False):
        super().__init__(d_model, dropout, normalize_before)
        self.multihead_attn = nn.MultiheadAttention(
            d_model, nhead, dropout=dropout, batch_first=True
        )
        self._xavier_init()

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        attn_mask: Optional[torch.Tensor],
        memory_with_pos: torch.Tensor,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            tgt, query_pos: [B, Q, C] queries and their position embedding.
            memory: [B, HW, C] pixel features (the values).
            attn_mask: bool [B, Q, HW], True where a query may not attend (shared by all
                heads), or None.
            memory_with_pos: [B, HW, C] pixel features plus their position embedding (the keys).
        """

        def attend(x):
            return multi_head_attention(
                self.multihead_attn, x + query_pos, memory_with_pos, memory, attn_mask
            )

        return self._residual(tgt, attend)


class FFNLayer(_ResidualBlock):
    """Two-layer feed-forward block with ReLU."""

    def __init__(self, d_model: int, dim_feedforward=2048, dropout=0.0, normalize_before=False):
        super().__init__(d_model, dropout, normalize_before)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self._xavier_init()

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self._residual(tgt, lambda x: self.linear2(self.dropout(F.relu(self.linear1(x)))))


class MLP(nn.Module):
    """A stack of ``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def masked_attention_mask(mask_logits: torch.Tensor) -> torch.Tensor:
    """
    The masked-attention mask of Mask2Former from mask logits already at the attended scale.

    A query may attend to a pixel only where its predicted mask is on (sigmoid >= 0.5). A query
    whose mask is off everywhere attends everywhere instead (its row is un-masked), so no query
    is left without keys.

    Args:
        mask_logits: [B, Q, h, w] mask logits at the resolution of the attended features.

    Returns:
        bool tensor [B, Q, h * w], True where attention is blocked (the same for all heads).
    """
    blocked = mask_logits.detach().flatten(2).sigmoid() < 0.5
    # (the official boolean-index assignment of the fully blocked rows needs their indices on the
    # host, a device sync; the broadcast "and" does not)
    return blocked & ~blocked.all(dim=-1, keepdim=True)


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """
    Learnable queries refined by ``dec_layers`` blocks of (masked cross-attention, self-attention,
    FFN), attending round-robin to three feature scales (lowest resolution first). Class and mask
    predictions are made from the learnable queries and after every block; each prediction's mask
    (resized to the next scale) restricts the next cross-attention.

    Mask logits are ``einsum(mask_embed(query), mask_features)``. The attention masks are computed
    from the mask features resized to each scale, which equals resizing the full-resolution mask
    logits (bilinear resizing is linear and commutes with the channel contraction), so that
    full-resolution masks of intermediate layers are only computed when they are returned. The
    attention runs through ``multi_head_attention`` (one mask shared by all heads).
    """

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        dropout: float = 0.0,
        deep_supervision: bool = True,
    ):
        """
        Args:
            in_channels: channels of the three input feature maps.
            mask_classification: must be True (class prediction per query).
            num_classes: number of classes (a "no object" logit is added).
            hidden_dim: transformer width.
            num_queries: number of queries.
            nheads: attention heads.
            dim_feedforward: hidden width of the FFN blocks.
            dec_layers: number of decoder blocks (config DEC_LAYERS - 1).
            pre_norm: pre-LayerNorm blocks instead of post-LayerNorm.
            mask_dim: channels of the mask features.
            enforce_input_project: add the 1x1 input projections even if in_channels == hidden_dim.
            dropout: dropout inside the attention and FFN blocks (official code: 0).
            deep_supervision: return the intermediate predictions ("aux_outputs") in training
                by default (see ``forward``'s ``return_aux``). False: the loss has no auxiliary
                terms, so they are neither computed at full resolution nor matched.
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("MultiScaleMaskedTransformerDecoder only supports mask classification")
        self.mask_classification = mask_classification
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_queries = num_queries
        self.num_feature_levels = 3
        self.deep_supervision = deep_supervision

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)

        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout, pre_norm) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)

        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = PointwiseConv2d(in_channels, hidden_dim)
                weight_init.c2_xavier_fill(proj)
            else:
                proj = nn.Sequential()
            self.input_proj.append(proj)

        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        if cfg.MODEL.MASK_FORMER.DEC_LAYERS < 1:
            raise ValueError("MODEL.MASK_FORMER.DEC_LAYERS must be >= 1")
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": cfg.MODEL.MASK_FORMER.HIDDEN_DIM,
            "num_queries": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
            "nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            "dim_feedforward": cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD,
            # the prediction from the learnable queries counts as one of DEC_LAYERS predictions
            "dec_layers": cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1,
            "pre_norm": cfg.MODEL.MASK_FORMER.PRE_NORM,
            "enforce_input_project": cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "deep_supervision": cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION,
        }

    def forward(
        self,
        x: Sequence[torch.Tensor],
        mask_features: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        return_aux: Optional[bool] = None,
    ) -> Dict[str, object]:
        """
        Args:
            x: three feature maps [B, in_channels, H_l, W_l], lowest resolution first.
            mask_features: [B, mask_dim, H, W] per-pixel embeddings (1/4 scale).
            mask: unused (padding is not masked, as in the official code).
            return_aux: return the predictions of the learnable queries and of every block but
                the last as "aux_outputs" (deep supervision). Default: in training when built
                with ``deep_supervision``.

        Returns:
            dict with "pred_logits" [B, Q, num_classes + 1], "pred_masks" [B, Q, H, W] and
            "aux_outputs": a list of ``dec_layers`` such dicts (empty if not ``return_aux``).
        """
        del mask
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature maps, got {len(x)}")
        if return_aux is None:
            return_aux = self.training and self.deep_supervision
        # low-precision inference (MODEL.PRECISION): the readout of the queries runs in float32
        device_type = mask_features.device.type
        float32_readout = not self.training and torch.is_autocast_enabled(device_type)

        # per level: values (projected features + level embedding), keys (values + position
        # embedding), and the mask features resized to the level for the attention masks
        values, keys, level_mask_features = [], [], []
        for i, feature in enumerate(x):
            pos = self.pe_layer(feature).to(feature.dtype)
            value = self.input_proj[i](feature) + self.level_embed.weight[i][None, :, None, None]
            values.append(value.flatten(2).transpose(1, 2).contiguous())
            keys.append((value + pos).flatten(2).transpose(1, 2).contiguous())
            # (the attention masks are thresholded: no gradient flows through them)
            level_mask_features.append(resize_bilinear(mask_features.detach(), feature.shape[-2:]))

        batch_size = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch_size, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(batch_size, -1, -1)

        predictions_class: List[torch.Tensor] = []
        returned_mask_embeds: List[torch.Tensor] = []
        attn_mask = None
        for i in range(self.num_layers + 1):
            if i > 0:
                level = (i - 1) % self.num_feature_levels
                output = self.transformer_cross_attention_layers[i - 1](
                    output, values[level], attn_mask, keys[level], query_pos
                )
                output = self.transformer_self_attention_layers[i - 1](output, query_pos)
                output = self.transformer_ffn_layers[i - 1](output)

            is_last = i == self.num_layers
            next_level = i % self.num_feature_levels
            attention_features = None if is_last else level_mask_features[next_level]
            class_logits, mask_embed, attn_logits = self._readout(
                output, attention_features, float32_readout
            )
            predictions_class.append(class_logits)
            if is_last or return_aux:
                returned_mask_embeds.append(mask_embed)
            if not is_last:
                attn_mask = masked_attention_mask(attn_logits)
        predictions_mask = self._full_resolution_masks(returned_mask_embeds, mask_features)

        aux_outputs = []
        if return_aux:
            aux_outputs = [
                {"pred_logits": c, "pred_masks": m}
                for c, m in zip(predictions_class[:-1], predictions_mask[:-1])
            ]
        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": aux_outputs,
        }

    @staticmethod
    def _full_resolution_masks(
        mask_embeds: Sequence[torch.Tensor], mask_features: torch.Tensor
    ) -> List[torch.Tensor]:
        """
        The mask logits ``einsum("bqc,bchw->bqhw", mask_embed, mask_features)`` [B, Q, H, W] of
        each of S predictions, from one product of all their embeddings: [B, S * Q, C] x
        [B, C, H * W] (in training with deep supervision S = 10: one large product instead of 10
        with Q rows, and in the backward one product of inner size S * Q instead of 10 of Q whose
        [B, C, H, W] gradients are summed). Each result is a view of image-contiguous blocks.
        """
        batch, channels, height, width = mask_features.shape
        queries = mask_embeds[0].shape[1]
        embeds = torch.cat(list(mask_embeds), dim=1) if len(mask_embeds) > 1 else mask_embeds[0]
        logits = mask_logits(embeds, mask_features.reshape(batch, channels, height * width))
        return list(logits.view(batch, len(mask_embeds), queries, height, width).unbind(1))

    def _readout(
        self,
        output: torch.Tensor,
        attention_features: Optional[torch.Tensor],
        float32: bool,
    ):
        """
        Class logits [B, Q, K + 1] and mask embeddings [B, Q, C] of the queries ``output``, and,
        given the mask features resized to the next attended scale, the mask logits there (for
        the next attention mask; None without them).

        ``float32`` (low-precision inference): computed in float32 outside the enclosing autocast.
        The attention mask thresholds these mask logits (sigmoid >= 0.5), and bfloat16 rounding
        flips decisions near the threshold, each changing what a query attends to: on CamVid
        val, a small trained model's bf16 / fp32 argmax agreement went from 99.857 % to 99.894 %
        (the whole decoder in float32: 99.904 %, at 6 % of the bf16 inference time; this readout
        costs less than the run-to-run noise). The full-resolution mask product stays in the
        enclosing precision.
        """
        device_type = output.device.type
        with torch.autocast(device_type=device_type, enabled=False) if float32 else nullcontext():
            if float32:
                output = output.float()
                if attention_features is not None:
                    attention_features = attention_features.float()
            decoder_output = self.decoder_norm(output)
            mask_embed = self.mask_embed(decoder_output)
            attn_logits = None
            if attention_features is not None:
                # (thresholded: no gradient flows through the attention masks)
                attn_logits = torch.einsum(
                    "bqc,bchw->bqhw", mask_embed.detach(), attention_features
                )
            return self.class_embed(decoder_output), mask_embed, attn_logits
