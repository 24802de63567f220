"""The MaskFormer / Mask2Former meta-architecture (semantic segmentation)."""

import contextlib
import functools
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone
from detectron2.structures import ImageList
from torch import nn
from torch.nn import functional as F

from ..criterion import SetCriterion
from ..low_precision import LowPrecisionWeights
from ..matcher import HungarianMatcher
from ..point_sampling import bilinear_resize_matrix

logger = logging.getLogger(__name__)

# Semantic inference resizes, squashes and combines the Q mask logits a band of output rows at a
# time; a band holds about this many values (CPU: stays in cache; GPU: few kernel launches).
_BAND_ELEMENTS_CPU = 1 << 19
_BAND_ELEMENTS_GPU = 1 << 24


def semantic_inference_naive(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """
    The semantic segmentation of one image from its mask classification (the definition):
    ``einsum("qc,qhw->chw", softmax(mask_cls)[..., :-1], sigmoid(mask_pred))``.

    Args:
        mask_cls: [Q, K + 1] class logits (last = "no object").
        mask_pred: [Q, H, W] mask logits.

    Returns:
        [K, H, W] per-class scores.
    """
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())


def _resize_matrix(in_size: int, steps: Sequence[Tuple[int, int]], device) -> torch.Tensor:
    """
    The [n, in_size] matrix of successive 1-D bilinear resizes (align_corners=False), each
    followed by a crop: ``steps`` is a list of (resized size, kept leading entries).

    Built on the host once per (sizes, device) and the same tensor returned afterwards (the copy
    to a GPU blocks): callers must not modify it in place.
    """
    steps = tuple((int(resized), int(kept)) for resized, kept in steps)
    return _device_resize_matrix(int(in_size), steps, torch.device(device))


@functools.lru_cache(maxsize=32)
def _host_resize_matrix(in_size: int, steps: Tuple[Tuple[int, int], ...]) -> torch.Tensor:
    """:func:`_resize_matrix` on the host, float32 (cached: built outside inference mode, so
    that a matrix first made during an inference-mode evaluation stays usable by autograd, and
    outside autocast, so that one first made under autocast is not half precision)."""
    with torch.inference_mode(False), torch.autocast("cpu", enabled=False):
        matrix = torch.eye(in_size)
        size = in_size
        for resized, kept in steps:
            matrix = (bilinear_resize_matrix(size, resized) @ matrix)[:kept]
            size = kept
        return matrix


@functools.lru_cache(maxsize=32)
def _device_resize_matrix(
    in_size: int, steps: Tuple[Tuple[int, int], ...], device: torch.device
) -> torch.Tensor:
    with torch.inference_mode(False):
        return _host_resize_matrix(in_size, steps).to(device)


@functools.lru_cache(maxsize=32)
def _band_sources(
    in_size: int, steps: Tuple[Tuple[int, int], ...]
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """For every output row of :func:`_resize_matrix`, its first and last source row with a
    non-zero weight, as Python ints read from the host matrix (they depend only on the sizes; no
    device read-back)."""
    nonzero = _host_resize_matrix(in_size, steps) != 0
    first = nonzero.float().argmax(1)
    last = in_size - 1 - nonzero.flip(1).float().argmax(1)
    return tuple(first.tolist()), tuple(last.tolist())


def resized_semantic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    resize_masks_first: bool = False,
    band_elements: Optional[int] = None,
) -> torch.Tensor:
    """
    Semantic scores of one image, equal (up to float rounding) to the official procedure:
    the mask logits are upsampled (bilinear) to the padded input size and cropped to the image
    size; then either (default) ``semantic_inference_naive`` is applied and the [K, H, W] scores
    are resized to ``output_size``, or (``resize_masks_first``, the official
    SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE) the mask logits are resized to ``output_size``
    first.

    Bilinear resizing is separable and linear: per axis, upsampling, cropping and the optional
    second resize are one matrix. The width is resized first (on the low-resolution rows), then
    a band of output rows at a time is made by one product with rows of the (banded) height
    matrix, squashed by the sigmoid in place and combined with the class probabilities. The
    [Q, H, W] upsampled logits and their sigmoid are never materialised and padding is never
    upsampled.

    Args:
        mask_cls: [Q, K + 1] class logits.
        mask_pred: [Q, h, w] mask logits of the padded image.
        padded_size, image_size, output_size: (height, width) of the padded input, of the image
            inside it, and of the requested output.
        resize_masks_first: see above.
        band_elements: values (rows x queries x width) per band; default: a device-dependent
            size (``_BAND_ELEMENTS_CPU`` / ``_BAND_ELEMENTS_GPU``). It does not change results.

    Returns:
        float32 [K, output_size[0], output_size[1]].
    """
    mask_cls = mask_cls.float()
    mask_pred = mask_pred.float()
    device = mask_pred.device
    num_queries, low_h, low_w = mask_pred.shape
    # per axis: upsample to the padded size, crop to the image, (optionally) resize to the output
    all_steps = []
    for axis in range(2):
        steps = [(int(padded_size[axis]), int(image_size[axis]))]
        if resize_masks_first and output_size[axis] != image_size[axis]:
            steps.append((int(output_size[axis]), int(output_size[axis])))
        all_steps.append(tuple(steps))
    height_matrix = _resize_matrix(low_h, all_steps[0], device)
    width_matrix = _resize_matrix(low_w, all_steps[1], device)
    out_h, out_w = height_matrix.shape[0], width_matrix.shape[0]

    # width first, on the low-resolution rows: [h, Q, W'] (rows outermost: bands are contiguous)
    flat_rows = (mask_pred.transpose(0, 1) @ width_matrix.t()).view(low_h, -1)
    # the output rows of a band only depend on a few consecutive input rows
    first_src, last_src = _band_sources(low_h, all_steps[0])

    probs_t = F.softmax(mask_cls, dim=-1)[:, :-1].t().contiguous()  # [K, Q]
    scores = mask_pred.new_empty((out_h, probs_t.shape[0], out_w))
    if band_elements is None:
        band_elements = _BAND_ELEMENTS_CPU if device.type == "cpu" else _BAND_ELEMENTS_GPU
    band = max(1, band_elements // (num_queries * out_w))
    for start in range(0, out_h, band):
        stop = min(start + band, out_h)
        src0, src1 = min(first_src[start:stop]), max(last_src[start:stop]) + 1
        masks = height_matrix[start:stop, src0:src1] @ flat_rows[src0:src1]
        masks = masks.view(stop - start, num_queries, out_w).sigmoid_()
        scores[start:stop] = torch.matmul(probs_t, masks)  # [rows, K, W']
    scores = scores.permute(1, 0, 2).contiguous()

    if tuple(scores.shape[-2:]) != tuple(output_size):
        scores = F.interpolate(
            scores[None], size=output_size, mode="bilinear", align_corners=False
        )[0]
    return scores


def pad_images(images: Sequence[torch.Tensor], size_divisibility: int = 0) -> ImageList:
    """
    ``ImageList.from_tensors(images, size_divisibility)`` (zero padding at the bottom/right to
    the largest size, rounded up to a multiple of ``size_divisibility``), with the padded size
    computed from Python ints: Detectron2 computes it with tensors, which graph exporters
    (``torch.export``, ONNX) cannot resolve to fixed paddings.
    """
    image_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    height = max(h for h, _ in image_sizes)
    width = max(w for _, w in image_sizes)
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    batch = torch.stack(
        [F.pad(im, (0, width - w, 0, height - h)) for im, (h, w) in zip(images, image_sizes)]
    )
    return ImageList(batch, image_sizes)


# MODEL.PRECISION values: the autocast dtype of the eval-mode forward (None: float32, no autocast).
INFERENCE_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# MODEL.COMPILE: Dynamo's recompile limit is kept this far above the number of input sizes a
# model has compiled (past the limit Dynamo would run the network eagerly, with a warning only).
_RECOMPILE_HEADROOM = 8


def inference_autocast_dtype(precision: str, device_type: str) -> Optional[torch.dtype]:
    """
    The autocast dtype of the ``MODEL.PRECISION`` value ``precision`` for a model on
    ``device_type`` ("cpu", "cuda", ...): None for "fp32". Raises ValueError for an unknown value
    and for "fp16" off CUDA.
    """
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(
            f"MODEL.PRECISION must be one of {sorted(INFERENCE_PRECISIONS)}, got {precision!r}"
        )
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(
            f"MODEL.PRECISION 'fp16' is CUDA only, but the model is on {device_type!r}: use "
            "'bf16' (fast on CPUs with AMX / AVX512-BF16) or 'fp32' there"
        )
    return INFERENCE_PRECISIONS[precision]


# MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE values (see MaskFormer.class_weight_args).
CLASS_WEIGHT_MODES = ("none", "list", "inverse_sqrt_frequency")


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """
    Mask-classification semantic segmentation: backbone -> ``sem_seg_head`` (pixel decoder +
    transformer decoder) -> per-query class and mask logits, trained with ``criterion``
    (Hungarian matching + set losses). Inference combines them into per-class scores.

    Subclasses (e.g. SeMask) can extend the pieces separately: ``preprocess_image``,
    ``prepare_targets``, ``losses`` (receives the backbone features and batched inputs, so an
    extra per-pixel loss can be added), ``inference`` and ``semantic_inference``.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        num_queries: int,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        semantic_on: bool = True,
        mask_loss_ignore_value: Optional[int] = None,
        inference_precision: str = "fp32",
        compile_inference: bool = False,
    ):
        """
        Args:
            backbone: a detectron2 Backbone.
            sem_seg_head: returns {"pred_logits", "pred_masks", "aux_outputs"} from the features.
            criterion: a SetCriterion (its ``weight_dict`` weights the losses).
            num_queries: number of queries.
            size_divisibility: images are padded to a multiple of this; <= 0 uses the
                backbone's ``size_divisibility``.
            sem_seg_postprocess_before_inference: resize the mask logits to the output size
                before combining them with the classes (official option); otherwise combine at
                the input resolution and resize the per-class scores (official default).
            pixel_mean, pixel_std: per-channel normalisation of the input image.
            semantic_on: output "sem_seg" (the only inference implemented).
            mask_loss_ignore_value: if set, pixels of the inputs' "sem_seg" with this value (and
                the batch padding) are left out of the mask losses and matching costs; None is
                the official behaviour (they are negatives of every mask).
            inference_precision: "fp32", "bf16" or "fp16" (CUDA only; see
                ``INFERENCE_PRECISIONS``): the eval-mode backbone and head run under autocast to
                that dtype (the pixel decoder lets it reach its layers only when built with
                ``inference_autocast``; the transformer decoder reads its queries out in
                float32); the semantic inference and the outputs are float32.
                Training is not affected (SOLVER.AMP.* sets its precision).
            compile_inference: run the eval-mode backbone + head through ``torch.compile``
                (inductor; one compilation per input size, on its first forward). Training
                stays eager.
        """
        super().__init__()
        if not semantic_on:
            raise ValueError("only semantic segmentation inference is implemented (semantic_on)")
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        if size_divisibility <= 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.mask_loss_ignore_value = mask_loss_ignore_value
        if inference_precision not in INFERENCE_PRECISIONS:
            raise ValueError(
                f"inference_precision (MODEL.PRECISION) must be one of "
                f"{sorted(INFERENCE_PRECISIONS)}, got {inference_precision!r}"
            )
        self.inference_precision = inference_precision
        self.compile_inference = compile_inference
        # torch.compile of ``network_outputs``, made on the first eval forward that needs it,
        # and the input (shape, dtype) it has been called with
        self._compiled_network_outputs = None
        self._compiled_inputs = set()
        # the backbone and head with their autocast-cast weights kept between eager
        # low-precision inference forwards (LowPrecisionWeights); made on the first such forward
        self._low_precision_network = None

    @staticmethod
    def class_weight_args(cfg, num_classes: int) -> Dict:
        """
        SetCriterion's per-class weight arguments from ``MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE``:
        none for "none"; ``class_weights`` for "list"; for "inverse_sqrt_frequency", a
        ``class_weights_provider`` that computes them from ``DATASETS.TRAIN`` when the criterion
        first runs (training), so building the model for inference never reads the training set.
        """
        mf = cfg.MODEL.MASK_FORMER
        mode, weights = mf.CLASS_WEIGHTS_MODE, list(mf.CLASS_WEIGHTS)
        if mode not in CLASS_WEIGHT_MODES:
            raise ValueError(
                f"MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE must be one of {CLASS_WEIGHT_MODES}, "
                f"got {mode!r}"
            )
        if mode != "list" and weights:
            raise ValueError(
                "MODEL.MASK_FORMER.CLASS_WEIGHTS is only used with CLASS_WEIGHTS_MODE 'list' "
                f"(mode is {mode!r})"
            )
        if mode == "list":
            if len(weights) != num_classes:
                raise ValueError(
                    f"MODEL.MASK_FORMER.CLASS_WEIGHTS has {len(weights)} values for "
                    f"{num_classes} classes (MODEL.SEM_SEG_HEAD.NUM_CLASSES)"
                )
            return {"class_weights": [float(w) for w in weights]}
        if mode == "inverse_sqrt_frequency":
            # imported here: the model package does not load the data package unless a training
            # criterion needs the dataset's class frequencies
            from mask2former.data.class_frequency import dataset_class_weights

            provider = functools.partial(
                dataset_class_weights,
                tuple(cfg.DATASETS.TRAIN),
                num_classes,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
                cfg.DATASETS.POLYGON_DRAW_ORDER,
            )
            return {"class_weights_provider": provider}
        return {}

    @classmethod
    def build_criterion(cls, cfg, num_classes: int) -> SetCriterion:
        """The matcher and set criterion of ``cfg.MODEL.MASK_FORMER`` (official weights, plus
        the optional per-class weights, see ``class_weight_args``)."""
        mf = cfg.MODEL.MASK_FORMER
        matcher = HungarianMatcher(
            cost_class=mf.CLASS_WEIGHT,
            cost_mask=mf.MASK_WEIGHT,
            cost_dice=mf.DICE_WEIGHT,
            num_points=mf.TRAIN_NUM_POINTS,
        )
        weight_dict = {
            "loss_ce": mf.CLASS_WEIGHT,
            "loss_mask": mf.MASK_WEIGHT,
            "loss_dice": mf.DICE_WEIGHT,
        }
        if mf.DEEP_SUPERVISION:
            # one auxiliary prediction per decoder block: DEC_LAYERS - 1
            main_weights = list(weight_dict.items())
            weight_dict.update(
                {f"{k}_{i}": v for i in range(mf.DEC_LAYERS - 1) for k, v in main_weights}
            )
        return SetCriterion(
            num_classes,
            matcher=matcher,
            weight_dict=weight_dict,
            eos_coef=mf.NO_OBJECT_WEIGHT,
            losses=["labels", "masks"],
            num_points=mf.TRAIN_NUM_POINTS,
            oversample_ratio=mf.OVERSAMPLE_RATIO,
            importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
            **cls.class_weight_args(cfg, num_classes),
        )

    @classmethod
    def from_config(cls, cfg):
        mf = cfg.MODEL.MASK_FORMER
        if mf.TEST.PANOPTIC_ON or mf.TEST.INSTANCE_ON:
            raise ValueError("MODEL.MASK_FORMER.TEST.PANOPTIC_ON / INSTANCE_ON are not implemented")
        device_type = torch.device(cfg.MODEL.DEVICE).type
        precision = cfg.MODEL.PRECISION
        inference_autocast_dtype(precision, device_type)  # refuse bad values before building
        if precision == "bf16" and device_type == "cpu":
            # oneDNN's check: its bfloat16 kernels need AVX512 (native with AVX512-BF16 / AMX)
            onednn_bf16 = torch.backends.mkldnn.is_available() and bool(
                torch.ops.mkldnn._is_mkldnn_bf16_supported()
            )
            if not onednn_bf16:
                logger.warning(
                    "MODEL.PRECISION bf16 on a CPU without bfloat16 matrix instructions "
                    "(AVX512 / AVX512-BF16 / AMX): its bfloat16 convolutions and matrix products "
                    "are slower than float32 here (Swin-T Mask2Former: about 11x on an AVX2 "
                    "CPU); fp32 is the faster choice on this machine"
                )
        if cfg.MODEL.COMPILE:
            logger.info(
                "MODEL.COMPILE: the eval-mode backbone + sem_seg_head run through torch.compile "
                "(inductor); the first forward of each input size compiles. Training is eager."
            )
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": cls.build_criterion(cfg, sem_seg_head.num_classes),
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": mf.TEST.SEMANTIC_ON,
            "mask_loss_ignore_value": (
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE if mf.IGNORE_IN_MASK_LOSS else None
            ),
            "inference_precision": precision,
            "compile_inference": cfg.MODEL.COMPILE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: one dict per image with "image" (uint8 or float [C, H, W]) and, in
                training, "instances" (``gt_classes`` [N] and ``gt_masks`` [N, H, W] tensor or
                BitMasks); optionally "height"/"width", the requested output size.

        Returns:
            training: dict of weighted losses. Inference: one dict per image with "sem_seg",
            [K, height, width] float32 per-class scores.
        """
        images = self.preprocess_image(batched_inputs)
        if self.training:
            features = self.backbone(images.tensor)
            outputs = self.sem_seg_head(features)
            return self.losses(outputs, features, batched_inputs, images)
        outputs = self.inference_outputs(images.tensor)
        return self.inference(outputs, batched_inputs, images)

    def network_outputs(self, images: torch.Tensor) -> Dict:
        """The head's outputs for a batch of normalised, padded images [N, 3, H, W] (eager)."""
        return self.sem_seg_head(self.backbone(images))

    def inference_outputs(self, images: torch.Tensor) -> Dict:
        """
        ``network_outputs`` at the inference precision (autocast to ``inference_precision``'s
        dtype), through ``torch.compile`` if ``compile_inference``; "pred_logits" and
        "pred_masks" are returned as float32, so the semantic inference runs in float32.
        Eager and without gradients, the weights autocast would cast at each forward are kept
        cast between forwards (``_low_precision_modules``; same outputs).
        """
        dtype = inference_autocast_dtype(self.inference_precision, images.device.type)
        precision = contextlib.nullcontext()
        if dtype is not None:
            precision = torch.autocast(device_type=images.device.type, dtype=dtype)
        with precision:
            if self.compile_inference:
                outputs = self._run_compiled(images)
            elif dtype is not None and not torch.is_grad_enabled():
                backbone, head = self._low_precision_modules(dtype)
                outputs = head(backbone(images))
            else:
                outputs = self.network_outputs(images)
        return dict(
            outputs,
            pred_logits=outputs["pred_logits"].float(),
            pred_masks=outputs["pred_masks"].float(),
        )

    def _low_precision_modules(self, dtype: torch.dtype) -> Tuple[LowPrecisionWeights, ...]:
        """The backbone and the head as ``LowPrecisionWeights`` of ``dtype``: without gradients,
        the same outputs as under autocast alone, without casting their weights at every
        forward (kept until the model is put in training mode)."""
        kept = self._low_precision_network
        if (
            kept is None
            or kept[0].dtype != dtype
            or kept[0].module is not self.backbone
            or kept[1].module is not self.sem_seg_head
        ):
            kept = (
                LowPrecisionWeights(self.backbone, dtype),
                LowPrecisionWeights(self.sem_seg_head, dtype),
            )
            self._low_precision_network = kept
        return kept

    def train(self, mode: bool = True):
        if mode:
            # training changes the weights: the low-precision copies would only be remade
            self._low_precision_network = None
        return super().train(mode)

    def _run_compiled(self, images: torch.Tensor) -> Dict:
        """``network_outputs`` through ``torch.compile`` with static shapes: each new input
        size compiles (logged), and Dynamo's recompile limit is raised to stay above the number
        of sizes. A compilation failure is raised as a RuntimeError naming its cause (no eager
        fallback)."""
        if self._compiled_network_outputs is None:
            self._compiled_network_outputs = torch.compile(self.network_outputs, dynamic=False)
        signature = (tuple(images.shape), images.dtype)
        if signature not in self._compiled_inputs:
            self._compiled_inputs.add(signature)
            logger.info(
                "MODEL.COMPILE: compiling the %s inference network for input %s (%s); input "
                "sizes compiled so far: %d",
                self.inference_precision,
                "x".join(map(str, signature[0])),
                images.device.type,
                len(self._compiled_inputs),
            )
            config = torch._dynamo.config
            needed = len(self._compiled_inputs) + _RECOMPILE_HEADROOM
            config.recompile_limit = max(config.recompile_limit, needed)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, needed)
        try:
            return self._compiled_network_outputs(images)
        except (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.CppCompileError) as e:
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            compiler = torch._inductor.config.cpp.cxx[1]
            raise RuntimeError(
                f"MODEL.COMPILE: torch.compile failed on the {images.device.type} model "
                f"({type(e).__name__}: {cause}). On CPU, inductor builds C++ kernels with "
                f"{compiler!r} (torch._inductor.config.cpp.cxx, $CXX): check that this compiler "
                "is installed and works, or set MODEL.COMPILE False to run eagerly."
            ) from e

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise the images and pad them into one batch (size divisibility)."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return pad_images(images, self.size_divisibility)

    def prepare_targets(
        self, gt_instances, images: ImageList, sem_segs: Optional[List[torch.Tensor]] = None
    ) -> List[Dict[str, torch.Tensor]]:
        """Per-image {"labels", "masks"} with the masks zero-padded to the padded image size,
        and, with ``sem_segs`` (per-image [H, W] label maps), "valid": 1 where the label is not
        ``mask_loss_ignore_value``, 0 on ignored pixels and on the batch padding."""
        h_pad, w_pad = images.tensor.shape[-2:]
        targets = []
        for i, instances in enumerate(gt_instances):
            gt_masks = instances.gt_masks
            gt_masks = gt_masks if isinstance(gt_masks, torch.Tensor) else gt_masks.tensor
            padded = gt_masks.new_zeros((gt_masks.shape[0], h_pad, w_pad))
            padded[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks
            target = {"labels": instances.gt_classes, "masks": padded}
            if sem_segs is not None:
                sem_seg = sem_segs[i].to(padded.device)
                valid = torch.zeros((h_pad, w_pad), dtype=torch.float32, device=padded.device)
                valid[: sem_seg.shape[0], : sem_seg.shape[1]] = (
                    sem_seg != self.mask_loss_ignore_value
                ).float()
                target["valid"] = valid
            targets.append(target)
        return targets

    def losses(self, outputs, features, batched_inputs, images) -> Dict[str, torch.Tensor]:
        """
        The weighted training losses (names in ``criterion.weight_dict``; others are dropped).
        ``features`` (backbone outputs) are unused here; subclasses may add losses on them.
        """
        del features
        if "instances" not in batched_inputs[0]:
            raise ValueError("training inputs need 'instances' (gt_classes, gt_masks)")
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        sem_segs = None
        if self.mask_loss_ignore_value is not None:
            if "sem_seg" not in batched_inputs[0]:
                raise ValueError(
                    "MODEL.MASK_FORMER.IGNORE_IN_MASK_LOSS needs 'sem_seg' in the training inputs"
                )
            sem_segs = [x["sem_seg"] for x in batched_inputs]
        targets = self.prepare_targets(gt_instances, images, sem_segs)
        losses = self.criterion(outputs, targets)
        weight_dict = self.criterion.weight_dict
        return {k: v * weight_dict[k] for k, v in losses.items() if k in weight_dict}

    def inference(self, outputs, batched_inputs, images: ImageList) -> List[Dict]:
        """Per image {"sem_seg": [K, height, width]} from the final predictions."""
        padded_size = tuple(images.tensor.shape[-2:])
        results = []
        for mask_cls, mask_pred, inputs, image_size in zip(
            outputs["pred_logits"], outputs["pred_masks"], batched_inputs, images.image_sizes
        ):
            output_size = (inputs.get("height", image_size[0]), inputs.get("width", image_size[1]))
            sem_seg = self.semantic_inference(
                mask_cls, mask_pred, padded_size, tuple(image_size), output_size
            )
            results.append({"sem_seg": sem_seg})
        return results

    def semantic_inference(
        self,
        mask_cls: torch.Tensor,
        mask_pred: torch.Tensor,
        padded_size: Tuple[int, int],
        image_size: Tuple[int, int],
        output_size: Tuple[int, int],
    ) -> torch.Tensor:
        """Semantic scores [K, *output_size] of one image (see ``resized_semantic_inference``)."""
        return resized_semantic_inference(
            mask_cls,
            mask_pred,
            padded_size,
            image_size,
            output_size,
            resize_masks_first=self.sem_seg_postprocess_before_inference,
        )
