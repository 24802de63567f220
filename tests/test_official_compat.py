"""Compatibility with the official Mask2Former release: official-style YAML files (``_BASE_``
chain, ``!!python/object/apply:eval`` lists, the official key names) load and build the official
network, whose state dict has exactly the official parameter names and shapes (a listing derived
here from the architecture description of the paper / official code), and official-format
checkpoints (``.pkl`` of NumPy arrays) load with no missing or unexpected keys."""

import functools
import pickle
from pathlib import Path

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from dinat import add_dinat_config
from mask2former.engine import setup as engine_setup
from semask import add_semask_config

# the configuration train_net.py builds: Mask2Former + SeMask + DiNAT keys
build_cfg = functools.partial(
    engine_setup.build_cfg, add_configs=(add_semask_config, add_dinat_config)
)


BASE_YAML = """\
MODEL:
  BACKBONE:
    FREEZE_AT: 0
    NAME: "build_resnet_backbone"
  WEIGHTS: "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  RESNETS:
    DEPTH: 50
    STEM_TYPE: "basic"
    STEM_OUT_CHANNELS: 64
    STRIDE_IN_1X1: False
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
DATASETS:
  TRAIN: ("ade20k_sem_seg_train",)
  TEST: ("ade20k_sem_seg_val",)
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.0001
  MAX_ITER: 160000
  WARMUP_FACTOR: 1.0
  WARMUP_ITERS: 0
  WEIGHT_DECAY: 0.0001
  OPTIMIZER: "ADAMW"
  LR_SCHEDULER_NAME: "WarmupPolyLR"
  BACKBONE_MULTIPLIER: 0.1
  CLIP_GRADIENTS:
    ENABLED: True
    CLIP_TYPE: "full_model"
    CLIP_VALUE: 0.01
    NORM_TYPE: 2.0
  AMP:
    ENABLED: True
INPUT:
  MIN_SIZE_TRAIN: !!python/object/apply:eval ["[int(x * 0.1 * 512) for x in range(5, 21)]"]
  MIN_SIZE_TRAIN_SAMPLING: "choice"
  MIN_SIZE_TEST: 512
  MAX_SIZE_TRAIN: 2048
  MAX_SIZE_TEST: 2048
  CROP:
    ENABLED: True
    TYPE: "absolute"
    SIZE: (512, 512)
    SINGLE_CATEGORY_MAX_AREA: 1.0
  COLOR_AUG_SSD: True
  SIZE_DIVISIBILITY: 512
  FORMAT: "RGB"
  DATASET_MAPPER_NAME: "mask_former_semantic"
TEST:
  EVAL_PERIOD: 5000
  AUG:
    ENABLED: False
    MIN_SIZES: [256, 384, 512, 640, 768, 896]
    MAX_SIZE: 3584
    FLIP: True
DATALOADER:
  FILTER_EMPTY_ANNOTATIONS: True
  NUM_WORKERS: 4
VERSION: 2
"""

R50_YAML = """\
_BASE_: Base-ADE20K-SemanticSegmentation.yaml
MODEL:
  META_ARCHITECTURE: "MaskFormer"
  SEM_SEG_HEAD:
    NAME: "MaskFormerHead"
    IGNORE_VALUE: 255
    NUM_CLASSES: 150
    LOSS_WEIGHT: 1.0
    CONVS_DIM: 256
    MASK_DIM: 256
    NORM: "GN"
    PIXEL_DECODER_NAME: "MSDeformAttnPixelDecoder"
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
    DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES: ["res3", "res4", "res5"]
    COMMON_STRIDE: 4
    TRANSFORMER_ENC_LAYERS: 6
  MASK_FORMER:
    TRANSFORMER_DECODER_NAME: "MultiScaleMaskedTransformerDecoder"
    TRANSFORMER_IN_FEATURE: "multi_scale_pixel_decoder"
    DEEP_SUPERVISION: True
    NO_OBJECT_WEIGHT: 0.1
    CLASS_WEIGHT: 2.0
    MASK_WEIGHT: 5.0
    DICE_WEIGHT: 5.0
    HIDDEN_DIM: 256
    NUM_OBJECT_QUERIES: 100
    NHEADS: 8
    DROPOUT: 0.0
    DIM_FEEDFORWARD: 2048
    ENC_LAYERS: 0
    PRE_NORM: False
    ENFORCE_INPUT_PROJ: False
    SIZE_DIVISIBILITY: 32
    DEC_LAYERS: 10
    TRAIN_NUM_POINTS: 12544
    OVERSAMPLE_RATIO: 3.0
    IMPORTANCE_SAMPLE_RATIO: 0.75
    TEST:
      SEMANTIC_ON: True
      INSTANCE_ON: False
      PANOPTIC_ON: False
      OVERLAP_THRESHOLD: 0.8
      OBJECT_MASK_THRESHOLD: 0.8
"""

SWIN_T_YAML = """\
_BASE_: ../maskformer2_R50_bs16_160k.yaml
MODEL:
  BACKBONE:
    NAME: "D2SwinTransformer"
  SWIN:
    EMBED_DIM: 96
    DEPTHS: [2, 2, 6, 2]
    NUM_HEADS: [3, 6, 12, 24]
    WINDOW_SIZE: 7
    APE: False
    DROP_PATH_RATE: 0.3
    PATCH_NORM: True
  WEIGHTS: "swin_tiny_patch4_window7_224.pkl"
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
"""


def official_listing(
    embed=96,
    depths=(2, 2, 6, 2),
    window=7,
    heads=(3, 6, 12, 24),
    num_classes=150,
    hidden=256,
    queries=100,
    dec_layers=9,
    enc_layers=6,
    ffn=2048,
    enc_ffn=1024,
    n_heads=8,
    n_levels=3,
    n_points=4,
):
    """{name: shape} of an official Mask2Former (Swin, MSDeformAttn pixel decoder, multi-scale
    masked decoder) for semantic segmentation, from its architecture description."""
    keys = {}

    def linear(prefix, out_f, in_f, bias=True):
        keys[prefix + ".weight"] = (out_f, in_f)
        if bias:
            keys[prefix + ".bias"] = (out_f,)

    def norm(prefix, c):
        keys[prefix + ".weight"] = (c,)
        keys[prefix + ".bias"] = (c,)

    b = "backbone."
    keys[b + "patch_embed.proj.weight"] = (embed, 3, 4, 4)
    keys[b + "patch_embed.proj.bias"] = (embed,)
    norm(b + "patch_embed.norm", embed)
    dims = [embed * 2**i for i in range(4)]
    for i, (depth, c, h) in enumerate(zip(depths, dims, heads)):
        for j in range(depth):
            p = f"{b}layers.{i}.blocks.{j}."
            norm(p + "norm1", c)
            keys[p + "attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, h)
            keys[p + "attn.relative_position_index"] = (window * window, window * window)
            linear(p + "attn.qkv", 3 * c, c)
            linear(p + "attn.proj", c, c)
            norm(p + "norm2", c)
            linear(p + "mlp.fc1", 4 * c, c)
            linear(p + "mlp.fc2", c, 4 * c)
        if i < 3:
            linear(f"{b}layers.{i}.downsample.reduction", 2 * c, 4 * c, bias=False)
            norm(f"{b}layers.{i}.downsample.norm", 4 * c)
        norm(f"{b}norm{i}", c)

    d = "sem_seg_head.pixel_decoder."
    for k, c in enumerate(reversed(dims[1:])):  # res5, res4, res3
        keys[f"{d}input_proj.{k}.0.weight"] = (hidden, c, 1, 1)
        keys[f"{d}input_proj.{k}.0.bias"] = (hidden,)
        norm(f"{d}input_proj.{k}.1", hidden)
    keys[d + "transformer.level_embed"] = (n_levels, hidden)
    for layer in range(enc_layers):
        p = f"{d}transformer.encoder.layers.{layer}."
        linear(p + "self_attn.sampling_offsets", n_heads * n_levels * n_points * 2, hidden)
        linear(p + "self_attn.attention_weights", n_heads * n_levels * n_points, hidden)
        linear(p + "self_attn.value_proj", hidden, hidden)
        linear(p + "self_attn.output_proj", hidden, hidden)
        norm(p + "norm1", hidden)
        linear(p + "linear1", enc_ffn, hidden)
        linear(p + "linear2", hidden, enc_ffn)
        norm(p + "norm2", hidden)
    keys[d + "mask_features.weight"] = (hidden, hidden, 1, 1)
    keys[d + "mask_features.bias"] = (hidden,)
    keys[d + "adapter_1.weight"] = (hidden, dims[0], 1, 1)
    norm(d + "adapter_1.norm", hidden)
    keys[d + "layer_1.weight"] = (hidden, hidden, 3, 3)
    norm(d + "layer_1.norm", hidden)

    t = "sem_seg_head.predictor."
    for i in range(dec_layers):
        for kind, attn in (("self_attention", "self_attn"), ("cross_attention", "multihead_attn")):
            p = f"{t}transformer_{kind}_layers.{i}."
            keys[p + attn + ".in_proj_weight"] = (3 * hidden, hidden)
            keys[p + attn + ".in_proj_bias"] = (3 * hidden,)
            linear(p + attn + ".out_proj", hidden, hidden)
            norm(p + "norm", hidden)
        p = f"{t}transformer_ffn_layers.{i}."
        linear(p + "linear1", ffn, hidden)
        linear(p + "linear2", hidden, ffn)
        norm(p + "norm", hidden)
    norm(t + "decoder_norm", hidden)
    keys[t + "query_feat.weight"] = (queries, hidden)
    keys[t + "query_embed.weight"] = (queries, hidden)
    keys[t + "level_embed.weight"] = (n_levels, hidden)
    linear(t + "class_embed", num_classes + 1, hidden)
    for k in range(3):
        linear(f"{t}mask_embed.layers.{k}", hidden, hidden)
    keys["criterion.empty_weight"] = (num_classes + 1,)
    return keys


def _write_official_configs(root: Path) -> Path:
    (root / "swin").mkdir(parents=True)
    (root / "Base-ADE20K-SemanticSegmentation.yaml").write_text(BASE_YAML)
    (root / "maskformer2_R50_bs16_160k.yaml").write_text(R50_YAML)
    (root / "swin" / "maskformer2_swin_tiny_bs16_160k.yaml").write_text(SWIN_T_YAML)
    return root / "swin" / "maskformer2_swin_tiny_bs16_160k.yaml"


def test_official_yaml_builds_the_official_network(tmp_path):
    cfg = build_cfg(str(_write_official_configs(tmp_path)), ["MODEL.DEVICE", "cpu"])
    assert cfg.INPUT.MIN_SIZE_TRAIN == tuple(int(x * 0.1 * 512) for x in range(5, 21))
    model = build_model(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_listing()
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert wrong == {}
    # the official model zoo lists 47M parameters for this network
    n_params = sum(p.numel() for p in model.parameters())
    assert 47.0e6 < n_params < 47.7e6


def test_official_format_checkpoint_loads_strictly_and_round_trips(tmp_path):
    cfg = build_cfg(
        str(_write_official_configs(tmp_path)),
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.SWIN.DEPTHS",
            "[1, 1, 1, 1]",
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS",
            "1",
            "MODEL.MASK_FORMER.DEC_LAYERS",
            "3",
            "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES",
            "10",
        ],
    )
    torch.manual_seed(0)
    source = build_model(cfg).eval()
    # official releases are pickles of NumPy arrays: {"model": {name: ndarray}, "__author__": ...}
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    path = tmp_path / "model_final_official.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "FAIR"}, f)

    torch.manual_seed(1)
    target = build_model(cfg).eval()
    incompatible = DetectionCheckpointer(target)._load_model(
        DetectionCheckpointer(target)._load_file(str(path))
    )
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    image = torch.randint(0, 255, (3, 96, 80), dtype=torch.uint8)
    with torch.no_grad():
        a = source([{"image": image, "height": 96, "width": 80}])[0]["sem_seg"]
        b = target([{"image": image, "height": 96, "width": 80}])[0]["sem_seg"]
    assert a.shape == (150, 96, 80)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert np.isfinite(a.numpy()).all()
