"""ONNX export: each tiny model family (random weights saved and reloaded as a checkpoint) run
by ONNX Runtime on CPU reproduces the predictor's probabilities; the export-friendly padding
equals Detectron2's."""

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from dinat import add_dinat_config
from mask2former.engine import SafeCheckpointer, build_cfg
from mask2former.export import compare_onnx, export_config, export_onnx
from mask2former.inference.predictor import SemSegPredictor
from mask2former.modeling.meta_arch.mask_former_model import pad_images
from semask import add_semask_config

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

HEIGHT, WIDTH = 64, 96


def _tiny_cfg(name, opts=()):
    cfg = build_cfg(
        f"configs/tiny/{name}_cpu.yaml",
        ["MODEL.WEIGHTS", "", *opts],
        (add_semask_config, add_dinat_config),
    )
    return export_config(cfg)


def test_export_config_selects_exportable_impls():
    cfg = _tiny_cfg(
        "m2f_dinat_tiny",
        [
            "MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL",
            "fast",
            "MODEL.DINAT.ATTENTION_IMPL",
            "flex",
        ],
    )
    assert cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL == "pytorch"
    assert cfg.MODEL.DINAT.ATTENTION_IMPL == "reference"
    # Swin's window attention: the partition path (the CPU kernels are opaque to the exporter)
    assert _tiny_cfg("m2f_swin_tiny", []).MODEL.SWIN.ATTENTION_IMPL == "partition"


def test_export_config_records_the_fp32_eager_forward():
    cfg = _tiny_cfg("m2f_swin_tiny", ["MODEL.PRECISION", "bf16", "MODEL.COMPILE", "True"])
    assert cfg.MODEL.PRECISION == "fp32"
    assert cfg.MODEL.COMPILE is False


@pytest.mark.parametrize("sizes", [[(64, 96)], [(50, 70), (64, 33)], [(31, 97)]])
@pytest.mark.parametrize("divisibility", [0, 32])
def test_pad_images_equals_detectron2(sizes, divisibility):
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=gen) for h, w in sizes]
    expected = ImageList.from_tensors(images, divisibility)
    padded = pad_images(images, divisibility)
    assert torch.equal(padded.tensor, expected.tensor)
    assert [tuple(s) for s in padded.image_sizes] == [tuple(s) for s in expected.image_sizes]


# One family here: each dynamo export of a tiny model takes several minutes on 2 cores. The
# SeMask and DiNAT exports go through the same wrapper and passed this test when run by hand
# (`pytest tests/test_export_onnx.py` with their names added).
@pytest.mark.parametrize("name", ["m2f_swin_tiny"])
def test_onnx_runtime_reproduces_predictor(name, tmp_path):
    cfg = _tiny_cfg(name)
    torch.manual_seed(0)
    trained = build_model(cfg)
    weights = tmp_path / "model.pth"
    torch.save({"model": trained.state_dict()}, weights)
    model = build_model(cfg).eval()
    SafeCheckpointer(model).load_for_inference(str(weights))

    path = tmp_path / "model.onnx"
    wrapper = export_onnx(model, str(path), HEIGHT, WIDTH)
    report = compare_onnx(str(path), wrapper)
    assert report["max_abs_diff"] < 1e-4 and report["argmax_agreement"] >= 0.999

    # against the project's predictor on an image of the export size (test size = short edge)
    image = np.random.default_rng(1).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    predictor = SemSegPredictor(
        model, test_sizes=(HEIGHT,), max_size=WIDTH, input_format=cfg.INPUT.FORMAT
    )
    expected = predictor(image).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["probs"]
    feed = image.transpose(2, 0, 1)[None].astype(np.float32)
    probs = session.run(["probs"], {"image": feed})[0]
    assert probs.shape == (1, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, HEIGHT, WIDTH)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs[0], expected, atol=1e-4, rtol=0)
    assert (probs[0].argmax(0) == expected.argmax(0)).mean() >= 0.999
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
