"""Config keys of the mask2former package.

``add_maskformer2_config`` adds every key of the official Mask2Former code (so its YAML files load
unchanged) plus this project's keys for the competition loop (datasets, polygon rasterisation,
validation, copy-paste, evaluation). Call ``add_deeplab_config`` first (poly LR schedule keys).
"""

from detectron2.config import CfgNode as CN


def add_maskformer2_config(cfg):
    """Add Mask2Former (official names) and project keys to ``cfg`` in place."""
    # ------------------------------------------------------------------ input / data mapper
    # Which dataset mapper the trainer builds: "mask_former_semantic" (the only one here).
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    # Photometric "SSD" colour jitter (brightness, contrast, saturation, hue) in the train mapper.
    cfg.INPUT.COLOR_AUG_SSD = False
    # Retry random crops until no single category covers more than this fraction of the crop
    # (ignore pixels not counted). 1.0 disables the constraint.
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Pad image (with 128, as the official mapper) and target (with the ignore label) to a multiple
    # of this in the train mapper; -1 = no padding in the mapper (the model pads to its own size
    # divisibility).
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # Large-scale-jitter keys of the official code (instance/panoptic mappers; kept for YAML
    # compat).
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0

    # ------------------------------------------------------------------ solver
    # Weight decay applied to embedding parameters (query features / positions, level embeddings).
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # "ADAMW" or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Learning-rate multiplier for parameters of the backbone.
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Exponential moving average (EMA) of the weights, updated after every step, saved in the
    # checkpoints (key "ema", restored by --resume), evaluated next to the raw weights (results
    # under ema/ in the metrics, files in OUTPUT_DIR/inference_ema) and written at the end of
    # training as the plain model checkpoint OUTPUT_DIR/model_final_ema.pth.
    cfg.SOLVER.EMA = CN()
    cfg.SOLVER.EMA.ENABLED = False
    # Decay once warmed up: each update moves the average by (1 - DECAY) toward the weights (it
    # averages over about 1 / (1 - DECAY) iterations: 0.9999 suits 100k-iteration schedules,
    # 0.999 about 10k).
    cfg.SOLVER.EMA.DECAY = 0.9999
    # Warm-up time constant (iterations) of the decay: update t uses
    # DECAY * (1 - exp(-t / WARMUP_ITERS)), so the early average follows the weights instead of
    # remembering the initial ones (63% of DECAY after WARMUP_ITERS). 0 = DECAY from the start.
    cfg.SOLVER.EMA.WARMUP_ITERS = 2000
    # Floating-point buffers (BatchNorm running statistics): "average" (like the parameters, so
    # they match the averaged weights) or "copy" (the model's current values). Integer buffers
    # (indices, counters) are always copied.
    cfg.SOLVER.EMA.BUFFERS = "average"
    # Evaluate the EMA weights whenever the raw ones are evaluated (TEST.EVAL_PERIOD and the end
    # of training); False saves the evaluation time (the EMA is still updated and saved).
    cfg.SOLVER.EMA.EVAL = True
    # Autocast dtype of mixed-precision training (SOLVER.AMP.ENABLED, GPU only): "float16" (alias
    # "fp16"; loss scaling) or "bfloat16" ("bf16"; float32's exponent range, no loss scaling,
    # better for transformers on GPUs that have it: Ampere and newer). Detectron2 0.6 has no such
    # key; where the installed Detectron2 defines it, its default is kept.
    if "PRECISION" not in cfg.SOLVER.AMP:
        cfg.SOLVER.AMP.PRECISION = "float16"

    # ------------------------------------------------------------------ weights files
    # Read MODEL.WEIGHTS and resumed checkpoints with plain pickle / torch.load(weights_only=False),
    # which RUNS ANY CODE the file contains: only for trusted legacy files holding Python objects
    # besides arrays. False: .pkl files may hold only plain data and NumPy arrays (as official
    # checkpoints do) and .pth files only tensors and plain data; anything else is refused.
    cfg.MODEL.WEIGHTS_ALLOW_CODE_EXECUTION = False

    # ------------------------------------------------------------------ inference precision
    # Precision of the eval-mode forward (every inference path: evaluation, prediction, TTA,
    # probability dumps); training keeps SOLVER.AMP.*. "fp32"; "bf16": backbone, pixel decoder
    # layers and transformer decoder layers under bfloat16 autocast; the backbone's convolution
    # on the image, the deformable-attention sampling, the transformer decoder's readout of the
    # queries (class and mask heads, the mask logits its masked attention thresholds) and the
    # semantic inference (class softmax x mask sigmoid, resize) in float32, float32 outputs (fast
    # on CPUs with AMX / AVX512-BF16, several times slower on CPUs without them);
    # "fp16": the same in float16, CUDA only (refused on CPU).
    cfg.MODEL.PRECISION = "fp32"
    # torch.compile (inductor) the backbone + segmentation head for the eval-mode forward; the
    # first forward of each input size compiles (minutes for large models). Training is eager.
    # Inductor on CPU needs a C++ compiler; a failed compilation is an error naming its cause.
    cfg.MODEL.COMPILE = False

    # ------------------------------------------------------------------ Mask2Former model
    cfg.MODEL.MASK_FORMER = CN()
    # Loss on the predictions of every decoder layer (auxiliary losses).
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    # Classification weight of the "no object" class.
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    # Per-class weights against class imbalance, applied to the classification cross-entropy
    # (whose class weights become [w_0, ..., w_{K-1}, NO_OBJECT_WEIGHT]) and to the matcher's
    # class cost (-w[c] * p[c]). Not to be confused with CLASS_WEIGHT, the loss's overall weight.
    # "none": every class 1 (official); "list": the weights of CLASS_WEIGHTS;
    # "inverse_sqrt_frequency": w_c proportional to 1 / sqrt(fraction of the labelled pixels of
    # DATASETS.TRAIN with class c), mean 1 over the classes present, 1 for absent classes;
    # computed and logged at the first training iteration (inference never reads the data).
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHTS_MODE = "none"
    # With CLASS_WEIGHTS_MODE "list": one positive weight per class (MODEL.SEM_SEG_HEAD.NUM_CLASSES
    # values, background included); must stay empty with the other modes.
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHTS = []
    # Loss weights (also used as matching costs): classification CE, dice, sigmoid BCE on masks.
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 1.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 1.0
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 20.0
    # Transformer decoder: attention heads, dropout, FFN width.
    cfg.MODEL.MASK_FORMER.NHEADS = 8
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.1
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    # Transformer encoder layers inside the decoder module (0 for Mask2Former).
    cfg.MODEL.MASK_FORMER.ENC_LAYERS = 0
    # Decoder layers + 1 (the extra one is the prediction made from the learnable queries alone).
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 6
    # Pre-LayerNorm transformer blocks.
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    # Query / transformer width.
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    # Number of object queries.
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100
    # Which features feed the transformer decoder: "multi_scale_pixel_decoder" for Mask2Former.
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res5"
    # Always add a 1x1 input projection before the decoder, even when widths already match.
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    # Name in TRANSFORMER_DECODER_REGISTRY.
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    # Images are padded to a multiple of this (0/-1: use the backbone's size_divisibility).
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32
    # Points sampled per mask for the mask losses (and the matcher) during training.
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 112 * 112
    # Leave pixels with the ignore label (MODEL.SEM_SEG_HEAD.IGNORE_VALUE: pseudo-label pixels
    # below the confidence threshold, "void" classes, crop padding) out of the mask losses and
    # the matching costs. False is the official behaviour, where every mask treats them as
    # negatives; turn it on when the labels have large ignored regions (pseudo-labels).
    cfg.MODEL.MASK_FORMER.IGNORE_IN_MASK_LOSS = False
    # PointRend importance sampling: oversampling factor k and importance ratio beta.
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75

    cfg.MODEL.MASK_FORMER.TEST = CN()
    # Output types at inference. Only semantic segmentation is implemented in this project.
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    # Thresholds of panoptic/instance inference (kept for YAML compatibility).
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.0
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.0
    # Combine class and mask predictions before resizing to the output size (official option).
    cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False

    # ------------------------------------------------------------------ pixel decoder / head
    # Channels of the mask features (per-pixel embeddings).
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    # Deformable-attention encoder layers in the pixel decoder.
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 0
    # Name of the pixel decoder in SEM_SEG_HEADS_REGISTRY.
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    # Backbone features the deformable encoder attends over (coarsest three).
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    # Sampling points per head per level of the deformable attention.
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    # Heads of the deformable attention. As in the official code the encoder really uses
    # MODEL.MASK_FORMER.NHEADS; this key must equal it (checked when the model is built).
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    # Implementation of multi-scale deformable attention, all with the same numbers: "pytorch"
    # (the official grid_sample path), "fast" (this project's PyTorch gather path, several times
    # faster on CPU), "cpu" (C++ kernels for CPU tensors, compiled on first use with the system's
    # C++ compiler into $MASK2FORMER_KERNEL_CACHE or ~/.cache/trash-mask2former/kernels), "triton"
    # (Triton kernels for CUDA, fp32 accumulation), or "auto" ("cpu" on CPU, or "fast" with a
    # warning where no compiler can build the kernels; "triton" on CUDA when Triton is
    # importable, else "pytorch").
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL = "auto"

    # ------------------------------------------------------------------ Swin backbone
    cfg.MODEL.SWIN = CN()
    # Image size of the ImageNet pretraining (sets the absolute position embedding size if APE).
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    # Attention scale override (None: head_dim ** -0.5).
    cfg.MODEL.SWIN.QK_SCALE = None
    cfg.MODEL.SWIN.DROP_RATE = 0.0
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    # Stochastic depth, linearly increasing over blocks up to this rate.
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    # Absolute position embedding.
    cfg.MODEL.SWIN.APE = False
    # LayerNorm after patch embedding.
    cfg.MODEL.SWIN.PATCH_NORM = True
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Activation checkpointing in every Swin block (saves memory, costs time).
    cfg.MODEL.SWIN.USE_CHECKPOINT = False
    # Stages frozen during training: -1 none, 0 patch embedding, i >= 1 patch embedding +
    # stages < i.
    cfg.MODEL.SWIN.FROZEN_STAGES = -1
    # Initialisation of the Swin Linear layers before any checkpoint is loaded: "official"
    # (as the official Mask2Former backbone, which never calls the classifier's init: PyTorch's
    # default Linear init) or "trunc_normal" (truncated normal std 0.02, zero biases).
    cfg.MODEL.SWIN.INIT = "official"
    # Window attention: "auto" runs the compiled CPU kernels (window_attention_cpu.cpp) for float32
    # / float64 CPU tensors and bf16 inference, which skip the padding tokens' projections and never
    # copy the windows; "partition" always pads, shifts and partitions the map (GPU, export). Same
    # numbers either way.
    cfg.MODEL.SWIN.ATTENTION_IMPL = "auto"

    # ------------------------------------------------------------------ datasets (project)
    # Competition data root (train_all.json, train.json, val.json, test.json + batch folders).
    # When set, registers trash_train_all, trash_train, trash_val and trash_test.
    cfg.DATASETS.TRASH_ROOT = ""
    # Extra COCO-polygon datasets, each [name, json_file, image_root] or [name, json_file,
    # image_root, uncovered]: uncovered "background" (category ids -> labels 1..K in id order,
    # uncovered pixels = Background class 0) or "ignore" (ids -> labels 0..K-1, uncovered pixels
    # = MODEL.SEM_SEG_HEAD.IGNORE_VALUE); default: the json's info.uncovered, else "background".
    cfg.DATASETS.COCO_SEMSEG = []
    # Extra label-map datasets, each [name, image_dir, label_dir, num_classes or [class names]];
    # label PNGs hold class ids (paired with images by file stem), MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    # is ignored.
    cfg.DATASETS.LABELMAP_SEMSEG = []
    # Pseudo-labeled splits written by tools/pseudo_label.py, each [name, pseudo_json, image_root];
    # label PNGs (ignore = MODEL.SEM_SEG_HEAD.IGNORE_VALUE) are found through the json.
    cfg.DATASETS.PSEUDO_LABELS = []
    # Order in which overlapping polygons are drawn: "area_desc" (largest first, smaller on top),
    # "area_asc", or "file" (json order, later on top).
    cfg.DATASETS.POLYGON_DRAW_ORDER = "area_desc"
    # What to do with each problem found when validating a COCO json: "fix", "skip", "error".
    cfg.DATASETS.VALIDATION = CN()
    # Duplicate annotation ids: "fix" keeps both (ids are not used for drawing), "skip" drops
    # repeats.
    cfg.DATASETS.VALIDATION.DUPLICATE_ANNOTATION_ID = "fix"
    # Polygons with fewer than 3 points: dropped ("skip") or fatal ("error").
    cfg.DATASETS.VALIDATION.DEGENERATE_POLYGON = "skip"
    # Coordinates outside the image: clipped ("fix"), annotation dropped ("skip"), or fatal.
    cfg.DATASETS.VALIDATION.OUT_OF_BOUNDS = "fix"
    # Polygons of zero or negative area: dropped ("skip") or fatal ("error").
    cfg.DATASETS.VALIDATION.ZERO_AREA = "skip"
    # Annotations whose category id is not in "categories": dropped ("skip") or fatal ("error").
    cfg.DATASETS.VALIDATION.UNKNOWN_CATEGORY = "error"
    # Images missing on disk / unreadable: dropped ("skip") or fatal ("error").
    cfg.DATASETS.VALIDATION.MISSING_IMAGE = "error"
    # Image size on disk differs from the json: "fix" trusts the file (annotations scaled), "skip",
    # "error".
    cfg.DATASETS.VALIDATION.SIZE_MISMATCH = "error"
    # Check every image file on disk at registration (opens headers; slower for huge sets).
    cfg.DATASETS.VALIDATION.CHECK_FILES = True
    # Also decode every image fully at registration to find truncated / corrupt files (slow).
    cfg.DATASETS.VALIDATION.VERIFY_IMAGES = False
    # An image that fails to decode while training (truncated / corrupt; only VERIFY_IMAGES finds
    # these at registration): "error" stops with the file name (a careful default: no image is
    # dropped unnoticed), "skip" warns once per file with the count and draws another image.
    cfg.DATASETS.VALIDATION.UNREADABLE_IMAGE = "error"
    # Several images with one id (annotations cannot be attributed): "skip" drops them all, "error".
    cfg.DATASETS.VALIDATION.DUPLICATE_IMAGE_ID = "error"
    # Several image entries naming one file: "fix" merges their annotations, "skip" keeps the first.
    cfg.DATASETS.VALIDATION.DUPLICATE_FILE_NAME = "fix"
    # Annotations whose image_id is not in "images": dropped ("skip") or fatal ("error").
    cfg.DATASETS.VALIDATION.ORPHAN_ANNOTATION = "skip"
    # json size equals the raw size of an EXIF-rotated image: "fix" rotates the annotations into the
    # displayed frame (what read_image returns), "skip" drops the image, "error".
    cfg.DATASETS.VALIDATION.EXIF_ROTATION = "fix"

    # ------------------------------------------------------------------ copy-paste bank (project)
    cfg.INPUT.COPY_PASTE = CN()
    # Regenerate a copy-paste bank before training and after every evaluation, and sample from it.
    cfg.INPUT.COPY_PASTE.ENABLED = False
    # Probability that the train mapper takes a bank image instead of an original one.
    cfg.INPUT.COPY_PASTE.PROB = 0.3
    # Number of images in the bank, regenerated before training and after every evaluation.
    cfg.INPUT.COPY_PASTE.BANK_SIZE = 400
    # Objects pasted per bank image (inclusive range).
    cfg.INPUT.COPY_PASTE.OBJECTS_PER_IMAGE = [1, 3]
    # Random scale applied to each pasted object (inclusive range).
    cfg.INPUT.COPY_PASTE.SCALE_RANGE = [0.5, 1.5]
    # Gaussian sigma (pixels) of alpha-blended paste edges; 0 = hard edges.
    cfg.INPUT.COPY_PASTE.BLEND_SIGMA = 0.0
    # Class sampling weights from the last evaluation: "one_minus_iou" or "uniform".
    cfg.INPUT.COPY_PASTE.CLASS_WEIGHTING = "one_minus_iou"
    # The DATASETS.TEST entry whose per-class IoUs weight the classes ("" = the first one).
    cfg.INPUT.COPY_PASTE.IOU_DATASET = ""
    # Bank folder (relative paths are inside OUTPUT_DIR).
    cfg.INPUT.COPY_PASTE.DIR = "copy_paste_bank"

    # ------------------------------------------------------------------ CPU runtime (project)
    # Process-wide settings that training, evaluation and prediction commands apply at start-up
    # (mask2former.engine.cpu_runtime; they change speed only). Flush denormal floats to zero on
    # CPU threads (torch.set_flush_denormal): arithmetic on them takes a slow path, and Swin's
    # shifted-window mask makes them in every shifted block.
    cfg.FLUSH_DENORMALS = True
    # Keep the host memory freed by tensors for reuse (glibc malloc: no mmap per block, no heap
    # trimming below 2 GiB free), so each step's tensors do not fault their pages in again; a
    # process keeps the memory of its peak. No effect on other C libraries.
    cfg.REUSE_HOST_MEMORY = True

    # ------------------------------------------------------------------ evaluation (project)
    # Write a confusion-matrix picture next to the metrics at every evaluation.
    cfg.TEST.CONFUSION_MATRIX_PLOT = True
