"""Set criterion of Mask2Former: Hungarian matching, then classification and point-sampled mask
losses on the final prediction and (deep supervision) on every auxiliary prediction."""

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from detectron2.utils import comm
from torch import nn
from torch.nn import functional as F

from .point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)


def sigmoid_ce_terms(
    inputs: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    Sigmoid binary cross-entropy averaged over the points of each mask: [N] for inputs (logits),
    targets [N, P]. ``weights`` [N, P] (0 = ignored point) turn the per-mask mean into a weighted
    mean (a mask whose points are all ignored gets 0).
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    if weights is None:
        return loss.mean(1)
    return (loss * weights).sum(1) / weights.sum(1).clamp_min(1e-6)


def sigmoid_ce_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`sigmoid_ce_terms` summed over masks and divided by ``num_masks``."""
    return sigmoid_ce_terms(inputs, targets, weights).sum() / num_masks


def dice_terms(
    inputs: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    Dice loss ``1 - (2 |s t| + 1) / (|s| + |t| + 1)`` (``s = sigmoid(inputs)``) of each mask: [N]
    for inputs (logits), targets [N, P]; ``weights`` [N, P] (0 = ignored point) weight the sums.
    """
    probs = inputs.sigmoid()
    if weights is not None:
        probs = probs * weights
        targets = targets * weights
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def dice_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`dice_terms` summed over masks and divided by ``num_masks``."""
    return dice_terms(inputs, targets, weights).sum() / num_masks


class MatchedIndices(NamedTuple):
    """One prediction set's matching on the predictions' device: ``batch`` and ``src`` (image and
    query of every matched prediction) and ``tgt`` (the matched target of each, per image)."""

    batch: torch.Tensor
    src: torch.Tensor
    tgt: Tuple[torch.Tensor, ...]


def matched_indices(indices, device) -> MatchedIndices:
    """The matcher's per-image (query indices, target indices) (host tensors) as
    :class:`MatchedIndices` on ``device``, with one host-to-device copy for all of them. On CUDA
    the copy is from pinned memory and does not block the host (a plain copy waits for the
    device, and the losses used one per index tensor and image)."""
    device = torch.device(device)
    counts = [len(src) for src, _ in indices]
    batch = [torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(counts)]
    srcs = [src.to(device="cpu", dtype=torch.int64) for src, _ in indices]
    tgts = [tgt.to(device="cpu", dtype=torch.int64) for _, tgt in indices]
    host = torch.cat(batch + srcs + tgts) if indices else torch.empty(0, dtype=torch.int64)
    if device.type == "cuda":
        joined = host.pin_memory().to(device, non_blocking=True)
    else:
        joined = host.to(device)
    total = sum(counts)
    batch_idx, src_idx, tgt_idx = joined.split([total, total, total])
    return MatchedIndices(batch_idx, src_idx, tgt_idx.split(counts))


class SetCriterion(nn.Module):
    """
    Loss of mask-classification models (DETR-style set prediction).

    For each prediction set (the final one and every entry of "aux_outputs"), queries are
    matched to targets by ``matcher``; then

    * "labels": cross-entropy of all queries' class logits, unmatched queries having the
      "no object" class ``num_classes``, weighted by ``empty_weight`` (1 for real classes,
      ``eos_coef`` for "no object") times the optional per-class weights (see below);
    * "masks": on the matched masks only, sigmoid BCE and dice on ``num_points`` points per mask
      chosen by PointRend importance sampling of the predicted mask, each summed over masks and
      divided by the number of target masks in the batch (averaged over processes, >= 1).

    Returns unweighted losses "loss_ce", "loss_mask", "loss_dice" and, for auxiliary prediction
    i, "loss_ce_{i}", ...; ``weight_dict`` holds the weights the meta-architecture applies.

    Per-class weights (class imbalance): K weights ``w`` multiply the cross-entropy's class
    weights, which become ``[w_0, ..., w_{K-1}, eos_coef]`` ("no object" keeps ``eos_coef``), so
    "loss_ce" is ``F.cross_entropy(..., weight=[w..., eos_coef])``, the weighted mean as torch
    defines it (``sum_q weight[y_q] CE_q / sum_q weight[y_q]``). The same ``w`` go to the matcher
    (``matcher.set_class_weights``), whose class cost then becomes ``-w[class] * p[class]``, so
    matching prefers the queries that the weighted loss rewards. Without weights, the losses are
    the official ones, unchanged.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        class_weights: Optional[Sequence[float]] = None,
        class_weights_provider: Optional[Callable[[], Sequence[float]]] = None,
    ):
        """
        Args:
            num_classes: number of classes, without "no object".
            matcher: returns per image (prediction indices, target indices).
            weight_dict: loss name -> weight (used by the caller).
            eos_coef: classification weight of the "no object" class.
            losses: subset of ("labels", "masks").
            num_points, oversample_ratio, importance_sample_ratio: point sampling of mask losses.
            class_weights: optional K positive per-class weights (see the class docstring);
                the matcher must then have ``set_class_weights`` (HungarianMatcher has).
            class_weights_provider: alternative to ``class_weights``: a function returning them,
                called once, at the first ``forward`` (the model calls the criterion in training
                only), e.g. to compute them from the training set without reading it when the
                model is built for inference. Until then the weights are 1.
        """
        super().__init__()
        unknown = set(losses) - {"labels", "masks"}
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)
        if class_weights is not None and class_weights_provider is not None:
            raise ValueError("give class_weights or class_weights_provider, not both")
        weighted = class_weights is not None or class_weights_provider is not None
        # Not persistent: the config, not a checkpoint, decides the per-class weights.
        self.register_buffer(
            "class_weights", torch.ones(num_classes) if weighted else None, persistent=False
        )
        self._class_weights_provider = class_weights_provider
        if weighted:
            self.set_class_weights([1.0] * num_classes if class_weights is None else class_weights)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def set_class_weights(self, class_weights: Sequence[float]) -> None:
        """Set the K per-class weights of the classification loss and of the matcher's cost."""
        weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
        if weights.numel() != self.num_classes:
            raise ValueError(
                f"{weights.numel()} class weights given for {self.num_classes} classes"
            )
        if not (torch.isfinite(weights).all() and (weights > 0).all()):
            raise ValueError(f"class weights must be finite and positive, got {weights.tolist()}")
        if self.class_weights is None:
            raise ValueError("the criterion was built without class weights")
        self.class_weights.copy_(weights)
        self.matcher.set_class_weights(weights)

    def ce_class_weights(self) -> torch.Tensor:
        """The [K + 1] class weights of the cross-entropy (last: "no object")."""
        if self.class_weights is None:
            return self.empty_weight
        return self.empty_weight * torch.cat([self.class_weights, self.empty_weight.new_ones(1)])

    @staticmethod
    def _matched(indices, device) -> MatchedIndices:
        """``indices`` (the matcher's output, or already :class:`MatchedIndices`) on ``device``."""
        if isinstance(indices, MatchedIndices):
            return indices
        return matched_indices(indices, device)

    def loss_labels(self, outputs, targets, indices, num_masks) -> Dict[str, torch.Tensor]:
        """Weighted cross-entropy over all queries ("no object" for unmatched ones)."""
        logits = outputs["pred_logits"].float()
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        matched = self._matched(indices, logits.device)
        matched_classes = torch.cat(
            [t["labels"][tgt.to(t["labels"].device)] for t, tgt in zip(targets, matched.tgt)]
        )
        target_classes[matched.batch, matched.src] = matched_classes.to(logits.device)
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.ce_class_weights())
        return {"loss_ce": loss}

    def loss_masks(self, outputs, targets, indices, num_masks) -> Dict[str, torch.Tensor]:
        """Sigmoid BCE and dice of matched masks on importance-sampled points."""
        matched = self._matched(indices, outputs["pred_masks"].device)
        return self.mask_losses_of_sets([outputs["pred_masks"]], targets, [matched], num_masks)[0]

    # Target-mask pixels (float32 values) that one joint evaluation of the mask losses may
    # gather: prediction sets are evaluated together while their matched target masks stay
    # within it (64 MB), so that large batches keep the memory of one set at a time.
    mask_loss_gather_limit = 1 << 24

    def mask_losses_of_sets(
        self,
        pred_masks: Sequence[torch.Tensor],
        targets: List[Dict[str, torch.Tensor]],
        matches: Sequence[MatchedIndices],
        num_masks: float,
    ) -> List[Dict[str, torch.Tensor]]:
        """
        "loss_mask" and "loss_dice" of several prediction sets (their "pred_masks" [B, Q, h, w]
        and matchings), evaluated for the matched masks of several sets at once: one draw of
        points, one sampling and one loss evaluation instead of one per set (the deep
        supervision's 10 sets cost 10 times the operators otherwise). Consecutive sets are
        joined while their matched target masks hold at most ``mask_loss_gather_limit`` pixels
        (a set beyond it alone). Each mask gets its own independent points, as with one draw per
        set; each set's losses are sums over its own masks.
        """
        counts = [len(m.src) for m in matches]
        height, width = targets[0]["masks"].shape[-2:] if targets else (0, 0)
        groups: List[List[int]] = []
        for i, count in enumerate(counts):
            joined = sum(counts[j] for j in groups[-1]) + count if groups else None
            if joined is None or joined * height * width > self.mask_loss_gather_limit:
                groups.append([i])
            else:
                groups[-1].append(i)
        losses: List[Dict[str, torch.Tensor]] = []
        for group in groups:
            losses += self._mask_losses_together(
                [pred_masks[i] for i in group], targets, [matches[i] for i in group], num_masks
            )
        return losses

    def _mask_losses_together(self, pred_masks, targets, matches, num_masks):
        """:meth:`mask_losses_of_sets` of sets evaluated in one draw and one evaluation."""
        srcs = [masks[m.batch, m.src] for masks, m in zip(pred_masks, matches)]
        counts = [len(src) for src in srcs]
        if sum(counts) == 0:
            # no target in these sets: zero losses that keep the graph connected
            zeros = [masks.sum() * 0.0 for masks in pred_masks]
            return [{"loss_mask": zero, "loss_dice": zero.clone()} for zero in zeros]
        src_masks = torch.cat(srcs)[:, None]
        # every matched target of every set, as one index into all targets' masks
        offsets = [0]
        for t in targets:
            offsets.append(offsets[-1] + len(t["masks"]))
        device = src_masks.device
        tgt_index = torch.cat(
            [tgt + offset for m in matches for tgt, offset in zip(m.tgt, offsets)]
        ).to(targets[0]["masks"].device)
        all_masks = torch.cat([t["masks"] for t in targets])
        target_masks = all_masks[tgt_index][:, None].to(device=device, dtype=src_masks.dtype)

        with torch.no_grad():
            point_coords = get_uncertain_point_coords_with_randomness(
                src_masks,
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            point_labels = point_sample(target_masks, point_coords).squeeze(1)
            point_weights = None
            if "valid" in targets[0]:
                # the validity map of each matched mask's image, sampled at the same points
                image_index = torch.cat([m.batch for m in matches]).to(targets[0]["valid"].device)
                valid = torch.stack([t["valid"] for t in targets])[image_index]
                point_weights = point_sample(valid[:, None].to(src_masks), point_coords).squeeze(1)
        point_logits = point_sample(src_masks, point_coords).squeeze(1)
        bce = sigmoid_ce_terms(point_logits, point_labels, point_weights)
        dice = dice_terms(point_logits, point_labels, point_weights)
        losses = []
        for set_bce, set_dice, count in zip(bce.split(counts), dice.split(counts), counts):
            if count == 0:
                # this set matched nothing (another did): zero losses on its own graph
                zero = pred_masks[len(losses)].sum() * 0.0
                losses.append({"loss_mask": zero, "loss_dice": zero.clone()})
                continue
            losses.append(
                {"loss_mask": set_bce.sum() / num_masks, "loss_dice": set_dice.sum() / num_masks}
            )
        return losses

    def get_loss(self, loss, outputs, targets, indices, num_masks) -> Dict[str, torch.Tensor]:
        loss_fns = {"labels": self.loss_labels, "masks": self.loss_masks}
        return loss_fns[loss](outputs, targets, indices, num_masks)

    def num_masks(self, targets, device) -> float:
        """Number of target masks per process: averaged over processes, at least 1.

        The local count is a host number. With several processes it is summed by an all-reduce
        on ``device``, and reading the sum back waits for the device (the one host sync the
        criterion keeps: the losses are divided by a Python number, as in the official code).
        """
        count = float(sum(len(t["labels"]) for t in targets))
        if not (dist.is_available() and dist.is_initialized()):
            return max(count, 1.0)
        num = torch.full((1,), count, dtype=torch.float32, device=device)
        dist.all_reduce(num)
        return torch.clamp(num / comm.get_world_size(), min=1).item()

    def forward(self, outputs, targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: dict with "pred_logits" [B, Q, K + 1], "pred_masks" [B, Q, h, w] and
                optionally "aux_outputs" (a list of such dicts).
            targets: B dicts with "labels" [T_b] (int64), "masks" [T_b, H, W] (binary; the
                masks cover the same padded image as the predictions) and optionally "valid"
                [H, W] (1 = known, 0 = ignored pixel: left out of the mask losses and costs).

        Returns:
            dict of unweighted losses.
        """
        if self._class_weights_provider is not None:
            provider, self._class_weights_provider = self._class_weights_provider, None
            self.set_class_weights(provider())
        num_masks = self.num_masks(targets, outputs["pred_logits"].device)
        prediction_sets = [("", outputs)] + [
            (f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))
        ]
        matches = [
            matched_indices(self.matcher(predictions, targets), predictions["pred_logits"].device)
            for _, predictions in prediction_sets
        ]
        losses = {}
        if "labels" in self.losses:
            for (suffix, predictions), matched in zip(prediction_sets, matches):
                terms = self.loss_labels(predictions, targets, matched, num_masks)
                losses.update({k + suffix: v for k, v in terms.items()})
        if "masks" in self.losses:
            pred_masks = [predictions["pred_masks"] for _, predictions in prediction_sets]
            set_terms = self.mask_losses_of_sets(pred_masks, targets, matches, num_masks)
            for (suffix, _), terms in zip(prediction_sets, set_terms):
                losses.update({k + suffix: v for k, v in terms.items()})
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"class_weights={None if self.class_weights is None else self.class_weights.tolist()}"
        )
