"""2-D (dilated) neighborhood attention with relative positional bias.

Semantics are those of NATTEN <= 0.17 (the library the official DiNAT checkpoints were trained
with). Along each spatial axis of length ``L``, with kernel size ``k`` (odd) and dilation ``d``:

* query ``i`` belongs to the dilation group ``g = i mod d``; the group holds the positions
  ``g, g + d, g + 2d, ...`` (``Lg`` of them);
* the query's window is the ``k`` consecutive *group* positions starting at
  ``clamp(i // d - k // 2, 0, Lg - k)``: windows are shifted (not padded) at the borders, so every
  query attends to exactly ``k * k`` keys;
* the relative positional bias ``rpb`` of shape ``[heads, 2k - 1, 2k - 1]`` is indexed by
  ``(key - query) / d + k - 1`` on each axis (this also holds for the shifted border windows, as in
  NATTEN's ``get_pb_start``).

NATTEN requires every axis to be at least ``k * d`` long (then every group has ``Lg >= k``); the
functions here raise a ``ValueError`` otherwise. :class:`NeighborhoodAttention2D` reproduces what
NATTEN 0.14's module did with smaller inputs: zero-pad the input at the bottom/right to ``k * d``
before the qkv projection and crop the output.

Tensors use NATTEN's "heads last" layout: ``[batch, height, width, heads, head_dim]``.

Implementations (all compute the same function, see ``tests/test_neighborhood_attention.py``):

* ``"reference"``: :func:`na2d_reference`, brute force over explicitly built neighbour indices;
  the ground truth of the tests. Memory ``O(H * W * k^2 * head_dim)``.
* ``"tiled"``: :func:`na2d_tiled`, pure PyTorch; splits the input into dense dilation groups,
  cuts each group into square query tiles and attends every tile to the key region covering the
  windows of all its queries (a strided view of the keys), masking keys outside each query's window
  and adding the rpb through an attention mask. Tiles with the same window pattern share one mask,
  so each piece is one call of ``scaled_dot_product_attention`` (PyTorch's fused kernel in
  inference; its math backend when the rpb requires grad), in chunks of bounded size. Runs on any
  device; the default on CPU.
* ``"flex"``: :func:`na2d_flex`, ``torch.nn.attention.flex_attention`` with a ``score_mod`` adding
  the bias and a block mask for the window; compiled with ``torch.compile`` on CUDA. PyTorch's flex
  attention has no backward on CPU.
* ``"natten"``: :func:`na2d_natten`, NATTEN's fused ``natten.functional.na2d`` (NATTEN >= 0.20);
  no relative positional bias.
"""

from .dispatch import ATTENTION_IMPLS, na2d, resolve_attention_impl
from .flex import na2d_flex
from .layer import NeighborhoodAttention2D
from .natten_fused import na2d_natten, natten_fused_available
from .reference import na2d_reference
from .tiled import na2d_tiled

__all__ = [
    "ATTENTION_IMPLS",
    "NeighborhoodAttention2D",
    "na2d",
    "na2d_flex",
    "na2d_natten",
    "na2d_reference",
    "na2d_tiled",
    "natten_fused_available",
    "resolve_attention_impl",
]
