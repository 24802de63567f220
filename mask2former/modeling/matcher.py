"""Hungarian matching between predicted and ground-truth masks (Mask2Former)."""

import ctypes
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..kernels import cpu_or_fallback, load_library
from .point_sampling import point_sample

# Matching cost given to NaN / inf entries (finite costs are within a few tens).
INVALID_COST = 1e6


def batch_sigmoid_ce_cost(
    inputs: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    Mean sigmoid binary cross-entropy of every prediction against every target.

    Args:
        inputs: [N, P] logits.
        targets: [M, P] binary targets.
        weights: optional [P] point weights in [0, 1] (0 = ignored point); the mean becomes the
            weighted mean ``sum_p w_p BCE / sum_p w_p``.

    Returns:
        [N, M] costs ``mean_p BCE(inputs[n, p], targets[m, p])``.
    """
    # BCE(x, t) = softplus(x) - x * t, so the sum over points is one matrix product.
    # softplus(x) = log(exp(x) + exp(0)); logaddexp is exact and about 2x faster on CPU.
    softplus = torch.logaddexp(inputs, inputs.new_zeros(()))
    if weights is None:
        return (softplus.sum(-1, keepdim=True) - inputs @ targets.t()) / inputs.shape[1]
    neg = softplus @ weights[:, None]
    return (neg - (inputs * weights) @ targets.t()) / weights.sum().clamp_min(1e-6)


def batch_dice_cost(
    inputs: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    Dice loss (with +1 smoothing) of every prediction against every target.

    Args:
        inputs: [N, P] logits.
        targets: [M, P] binary targets.
        weights: optional [P] point weights (0 = ignored point): sums become weighted sums.

    Returns:
        [N, M] costs ``1 - (2 |s t| + 1) / (|s| + |t| + 1)`` with ``s = sigmoid(inputs)``.
    """
    probs = inputs.sigmoid()
    if weights is not None:
        probs = probs * weights
        targets = targets * weights
    numerator = 2 * (probs @ targets.t())
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def _mask_costs_pytorch(pred_masks, coords, tgt_points, weights):
    # all Q masks are channels of one map; channels-last sampling is ~2x faster on CPU
    pred = pred_masks[None].contiguous(memory_format=torch.channels_last)
    out_points = point_sample(pred, coords[None])[0]
    return (
        batch_sigmoid_ce_cost(out_points, tgt_points, weights),
        batch_dice_cost(out_points, tgt_points, weights),
    )


@functools.cache
def _point_sums_kernel():
    """The CPU kernel of the matcher's point sums, with its argument types."""
    function = load_library().matcher_point_sums_f32
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr, ptr, i64] + [ptr] * 4
    function.argtypes += [ctypes.c_int]
    function.restype = None
    return function


def _mask_costs_cpu(pred_masks, coords, tgt_points, weights):
    """The costs of :func:`mask_costs` from the sums of the compiled CPU kernel
    (``mask2former/kernels/csrc/matcher_cpu.cpp``): the points are sampled and the sums taken
    without forming the [Q, P] point values."""
    tensors = {"pred_masks": pred_masks, "coords": coords, "tgt_points": tgt_points}
    if weights is not None:
        tensors["weights"] = weights
    for name, t in tensors.items():
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise TypeError(
                f"the CPU kernel takes float32 CPU tensors, {name} is {t.dtype} on {t.device}"
            )
    num_queries, height, width = pred_masks.shape
    num_targets, num_points = tgt_points.shape
    if coords.shape != (num_points, 2) or (weights is not None and weights.shape != (num_points,)):
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        raise ValueError(f"point counts differ: {shapes}")
    pred = pred_masks.contiguous()
    # grid_sample's pixel (align_corners=False): coordinate * size - 0.5
    pixels = (coords * coords.new_tensor([width, height]) - 0.5).contiguous()
    if weights is None:
        tw = tww = tgt_points.contiguous()
        total_weight = float(num_points)
        target_sum = tgt_points.sum(-1)
    else:
        weights = weights.contiguous()
        tw = (tgt_points * weights).contiguous()
        tww = (tw * weights).contiguous()
        total_weight = weights.sum().clamp_min(1e-6)
        target_sum = tw.sum(-1)
    softplus_sum, sigmoid_sum = pred.new_empty(num_queries), pred.new_empty(num_queries)
    x_t, s_t = (pred.new_empty(num_queries, num_targets) for _ in range(2))
    _point_sums_kernel()(
        pred.data_ptr(), height, width, num_queries, pixels.data_ptr(),
        None if weights is None else weights.data_ptr(), num_points, tw.data_ptr(),
        tww.data_ptr(), num_targets, softplus_sum.data_ptr(), sigmoid_sum.data_ptr(),
        x_t.data_ptr(), s_t.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    cost_mask = (softplus_sum[:, None] - x_t) / total_weight
    cost_dice = 1 - (2 * s_t + 1) / (sigmoid_sum[:, None] + target_sum[None, :] + 1)
    return cost_mask, cost_dice


MASK_COST_IMPLS = {"pytorch": _mask_costs_pytorch, "cpu": _mask_costs_cpu}


def mask_costs(
    pred_masks: torch.Tensor,
    coords: torch.Tensor,
    tgt_points: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    impl: str = "pytorch",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The matcher's mask costs of one image: :func:`batch_sigmoid_ce_cost` and
    :func:`batch_dice_cost` of the predicted masks sampled at ``coords``.

    Args:
        pred_masks: [Q, h, w] float32 mask logits.
        coords: [P, 2] (x, y) point coordinates in [0, 1] (see :func:`point_sample`).
        tgt_points: [T, P] target values at the points.
        weights: optional [P] point weights.
        impl: "pytorch" (``grid_sample`` and matrix products, any device) or "cpu" (the
            compiled kernel, float32 CPU tensors; same values up to float32 rounding).

    Returns:
        ([Q, T] sigmoid cross-entropy cost, [Q, T] dice cost).
    """
    if impl not in MASK_COST_IMPLS:
        raise ValueError(f"unknown mask cost impl {impl!r}; one of {sorted(MASK_COST_IMPLS)}")
    return MASK_COST_IMPLS[impl](pred_masks, coords, tgt_points, weights)


def _cpu_default() -> str:
    """ "cpu" when the compiled CPU kernels load here, else "pytorch" (saying why, once)."""
    return cpu_or_fallback("The matcher's mask costs on CPU", "pytorch")


class HungarianMatcher(nn.Module):
    """
    One-to-one assignment of predictions (queries) to targets minimising
    ``cost_class * (-w[target class] * p[target class]) + cost_mask * BCE + cost_dice * dice``,
    where ``w`` are the optional per-class weights (1 without them, the official cost).

    The mask costs are computed on ``num_points`` points drawn uniformly at random per image and
    shared by all predicted and target masks, so no [Q, T, H, W] intermediate is formed. Costs are
    computed in float32 even under autocast; NaN / inf costs (from inf logits) are replaced by a
    large finite cost. Unmatched predictions are "no object".
    """

    def __init__(
        self,
        cost_class: float = 1,
        cost_mask: float = 1,
        cost_dice: float = 1,
        num_points: int = 12544,
        class_weights: Optional[Sequence[float]] = None,
        impl: str = "auto",
    ):
        """
        Args:
            cost_class, cost_mask, cost_dice: weights of the three costs.
            num_points: points sampled per image for the mask costs.
            class_weights: optional K per-class weights ``w`` (those of the classification
                loss): the class cost of target t becomes ``-w[c_t] * p[c_t]``, so the matcher
                prefers the queries that the class-weighted loss rewards. None: official cost.
            impl: how the mask costs are computed (:func:`mask_costs`): "pytorch", "cpu", or
                "auto": "cpu" (the compiled kernel) for CPU predictions where it can be built,
                else "pytorch".
        """
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        if num_points <= 0:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        if impl not in MASK_COST_IMPLS and impl != "auto":
            raise ValueError(
                f"unknown mask cost impl {impl!r}; one of {sorted(MASK_COST_IMPLS) + ['auto']}"
            )
        self.num_points = num_points
        self.impl = impl
        self.register_buffer("class_weights", None, persistent=False)
        if class_weights is not None:
            self.set_class_weights(class_weights)

    def set_class_weights(self, class_weights: Sequence[float]) -> None:
        """Set the K per-class weights of the class cost (see the constructor)."""
        weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
        if self.class_weights is not None:
            weights = weights.to(self.class_weights.device)
        self.class_weights = weights.clone()

    @torch.no_grad()
    def cost_matrix(
        self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, labels, masks, valid=None
    ) -> torch.Tensor:
        """
        The [Q, T] matching cost of one image (float32, on the predictions' device).

        Args:
            pred_logits: [Q, K + 1] class logits.
            pred_masks: [Q, h, w] mask logits.
            labels: [T] target classes.
            masks: [T, H, W] binary target masks (any resolution: coordinates are normalised).
            valid: optional [H, W] map, 1 where the target is known and 0 on ignored pixels; the
                mask costs then weight every point by its (bilinearly sampled) validity.
        """
        device = pred_masks.device
        with torch.autocast(device_type=device.type, enabled=False):
            cost_class = -pred_logits.float().softmax(-1)[:, labels]
            if self.class_weights is not None:
                cost_class = cost_class * self.class_weights.to(device)[labels.to(device)]
            coords = torch.rand(1, self.num_points, 2, device=device)
            tgt_points = point_sample(masks[None].to(device=device, dtype=torch.float32), coords)[0]
            weights = None
            if valid is not None:
                valid = valid[None, None].to(device=device, dtype=torch.float32)
                weights = point_sample(valid, coords)[0, 0]
            impl = self.impl
            if impl == "auto":
                impl = _cpu_default() if device.type == "cpu" else "pytorch"
            cost_mask, cost_dice = mask_costs(
                pred_masks.float(), coords[0], tgt_points, weights, impl
            )
        return (
            self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * cost_dice
        )

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: dict with "pred_logits" [B, Q, K + 1] and "pred_masks" [B, Q, h, w].
            targets: B dicts with "labels" [T_b], "masks" [T_b, H, W] and optionally "valid"
                [H, W] (see :meth:`cost_matrix`).

        Returns:
            B tuples (index_i, index_j) of int64 CPU tensors of length min(Q, T_b): prediction
            index_i[k] is matched to target index_j[k]; index_i is sorted.
        """
        # every image's cost matrix first, then one device-to-host copy for all of them (each
        # copy waits for the device), then the assignments on the host
        costs = {}
        for b, target in enumerate(targets):
            if target["labels"].numel() == 0:
                continue
            costs[b] = self.cost_matrix(
                outputs["pred_logits"][b],
                outputs["pred_masks"][b],
                target["labels"],
                target["masks"],
                target.get("valid"),
            )
        host_costs = {}
        if costs:
            # [Q, sum of T_b]: the images' matrices side by side
            joined = torch.cat(list(costs.values()), dim=1)
            # inf mask logits (fp16 overflow under AMP) give inf / NaN costs, which
            # linear_sum_assignment rejects: such predictions become the worst matches instead
            joined = torch.nan_to_num(
                joined, nan=INVALID_COST, posinf=INVALID_COST, neginf=-INVALID_COST
            )
            widths = [cost.shape[1] for cost in costs.values()]
            host_costs = dict(zip(costs, joined.cpu().split(widths, dim=1)))
        indices = []
        for b in range(len(targets)):
            if b not in host_costs:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(host_costs[b].contiguous().numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}, impl={self.impl}"
        )
