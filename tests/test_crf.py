"""DenseCRF post-processing: presets against the textbook pydensecrf calls, denoising and colour
edges on a synthetic image, zero iterations, the agreement overwrite and input validation."""

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from pydensecrf.utils import unary_from_softmax

from mask2former.postprocess.agreement import agreement_overwrite
from mask2former.postprocess.crf import (
    CRF_PRESETS,
    CRFParams,
    crf_unary,
    dense_crf,
    dense_crf_labels,
    resolve_crf_params,
)

H, W, K = 40, 60, 3
EDGE = 30  # colour edge: red left of column 30, blue from column 30


def two_region_image():
    image = np.zeros((H, W, 3), dtype=np.uint8)
    image[:, :EDGE] = (200, 40, 40)
    image[:, EDGE:] = (40, 40, 200)
    return image


def truth():
    return np.broadcast_to(np.where(np.arange(W) < EDGE, 1, 2), (H, W))


def noisy_probs(seed=0, flip_fraction=0.25):
    """0.7 on a label that is the truth except for a random quarter of the pixels."""
    rng = np.random.default_rng(seed)
    labels = truth().copy()
    flip = rng.random((H, W)) < flip_fraction
    labels[flip] = rng.integers(0, K, int(flip.sum()))
    probs = np.full((K, H, W), 0.15, dtype=np.float32)
    for k in range(K):
        probs[k][labels == k] = 0.7
    return probs / probs.sum(0)


def textbook_crf(image, probs, gaussian, bilateral, iterations):
    """The pydensecrf snippet the competition teams used, written out with the library's own
    unary helper (the independent reference)."""
    num_classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1])
    crf.addPairwiseBilateral(
        sxy=bilateral[0], srgb=bilateral[1], rgbim=np.ascontiguousarray(image), compat=bilateral[2]
    )
    return np.array(crf.inference(iterations)).reshape(num_classes, height, width)


# ------------------------------------------------------------------------------ presets


DOCUMENTED = {  # the teams' settings: (Gaussian sxy, compat), (bilateral sxy, srgb, compat)
    "default": ((3, 3), (49, 5, 4)),
    "bilateral_80_13_10": ((3, 3), (80, 13, 10)),
    "deeplab": ((1, 3), (67, 3, 4)),
}


def test_presets_hold_the_documented_values():
    assert set(CRF_PRESETS) == set(DOCUMENTED)
    for name, (gaussian, bilateral) in DOCUMENTED.items():
        params = resolve_crf_params(name)
        assert (params.gaussian_sxy, params.gaussian_compat) == gaussian
        assert (params.bilateral_sxy, params.bilateral_srgb, params.bilateral_compat) == bilateral


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_presets_run_the_documented_kernels(name):
    """dense_crf with a preset gives exactly the textbook pydensecrf computation with the
    documented numbers (so the preset really reaches the library)."""
    image, probs = two_region_image(), noisy_probs()
    gaussian, bilateral = DOCUMENTED[name]
    expected = textbook_crf(image, probs, gaussian, bilateral, iterations=3)
    np.testing.assert_array_equal(dense_crf(image, probs, name, iterations=3), expected)
    # and the other presets give something else on this input
    others = [n for n in DOCUMENTED if n != name]
    assert all(
        not np.array_equal(dense_crf(image, probs, o, iterations=3), expected) for o in others
    )


def test_custom_parameters():
    image, probs = two_region_image(), noisy_probs()
    custom = dict(
        gaussian_sxy=2, gaussian_compat=1, bilateral_sxy=20, bilateral_srgb=8, bilateral_compat=6
    )
    np.testing.assert_array_equal(
        dense_crf(image, probs, custom, iterations=2),
        textbook_crf(image, probs, (2, 1), (20, 8, 6), iterations=2),
    )
    assert resolve_crf_params(CRFParams(**custom)) == CRFParams(**custom)
    assert CRF_PRESETS["default"].replace(bilateral_compat=10).bilateral_compat == 10
    with pytest.raises(ValueError, match="unknown CRF preset 'dense'"):
        resolve_crf_params("dense")
    with pytest.raises(ValueError, match="exactly"):
        resolve_crf_params({"gaussian_sxy": 3})
    with pytest.raises(ValueError, match="bilateral_srgb must be positive"):
        CRFParams(3, 3, 49, 0, 4)
    with pytest.raises(ValueError, match="gaussian_compat must be non-negative"):
        CRFParams(3, -1, 49, 5, 4)


def test_zero_weight_kernel_is_left_out():
    """compat 0 = the kernel contributes nothing: same result as pydensecrf without it."""
    image, probs = two_region_image(), noisy_probs()
    crf = dcrf.DenseCRF2D(W, H, K)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    expected = np.array(crf.inference(4)).reshape(K, H, W)
    got = dense_crf(image, probs, CRF_PRESETS["default"].replace(bilateral_compat=0), iterations=4)
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------ behaviour


def test_crf_removes_noise():
    image, probs = two_region_image(), noisy_probs()
    before = (probs.argmax(0) == truth()).mean()
    q = dense_crf(image, probs, "default", iterations=10)
    after = (q.argmax(0) == truth()).mean()
    assert before < 0.85
    assert after > 0.99
    assert q.dtype == np.float32 and q.shape == (K, H, W) and q.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)


def test_crf_moves_a_misplaced_boundary_to_the_colour_edge():
    """The probabilities put the boundary 4 columns too far right (weakly); the bilateral kernel
    moves it onto the colour edge, a Gaussian-only CRF does not."""
    image, probs = two_region_image(), noisy_probs()
    band = slice(EDGE, EDGE + 4)
    probs[:, :, band] = np.array([0.1, 0.5, 0.4], dtype=np.float32)[:, None, None]
    assert (probs.argmax(0)[:, band] == 1).all()  # wrong in the whole band (truth: 2)

    labels = dense_crf_labels(image, probs, "default", iterations=10)
    assert labels.dtype == np.uint8
    assert (labels[:, band] == 2).all()
    assert (labels[:, EDGE - 3 : EDGE] == 1).all()  # and the left side stays

    no_bilateral = CRF_PRESETS["default"].replace(bilateral_compat=0)
    gaussian_only = dense_crf_labels(image, probs, no_bilateral, iterations=10)
    assert (gaussian_only[:, band] == 2).mean() < 0.5


def test_zero_iterations_return_the_input_argmax():
    image = two_region_image()
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(K), size=(H, W)).transpose(2, 0, 1).astype(np.float32)
    probs[:, 0, :5] = np.array([0.0, 0.0, 1.0])[:, None]  # zeros get clipped
    q = dense_crf(image, probs, "default", iterations=0)
    np.testing.assert_array_equal(q.argmax(0), probs.argmax(0))
    clipped = np.clip(probs.astype(np.float64), 1e-5, 1.0)
    np.testing.assert_allclose(q, clipped / clipped.sum(0), rtol=1e-5, atol=1e-7)


def test_float16_input_equals_float32_of_the_same_values():
    image, probs = two_region_image(), noisy_probs().astype(np.float16)
    np.testing.assert_array_equal(
        dense_crf(image, probs, iterations=3),
        dense_crf(image, probs.astype(np.float32), iterations=3),
    )


def test_unary_is_negative_log_of_clipped_probabilities():
    probs = noisy_probs()
    probs[0, 0, 0] = 0.0
    unary = crf_unary(probs)
    assert unary.dtype == np.float32 and unary.shape == (K, H * W) and unary.flags["C_CONTIGUOUS"]
    expected = -np.log(np.clip(probs.astype(np.float64), 1e-5, 1.0)).reshape(K, -1)
    np.testing.assert_allclose(unary, expected, rtol=1e-6)
    assert unary[0, 0] == pytest.approx(-np.log(1e-5), rel=1e-6)


# ------------------------------------------------------------------------------ agreement overwrite


def test_agreement_overwrite_hand_case():
    crf_labels = np.array([[0, 0, 0], [1, 1, 1]], dtype=np.uint8)
    agreed = np.array([[5, 2, 0], [3, 9, 1]], dtype=np.int64)
    mask = np.array([[False, True, True], [True, False, False]])
    out = agreement_overwrite(crf_labels, agreed, mask)
    np.testing.assert_array_equal(out, [[0, 2, 0], [3, 1, 1]])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(crf_labels, [[0, 0, 0], [1, 1, 1]])  # input untouched


def test_agreement_overwrite_validation():
    labels = np.zeros((2, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="agreement mask have shape"):
        agreement_overwrite(labels, labels, np.zeros((3, 2), dtype=bool))
    with pytest.raises(ValueError, match="must be bool"):
        agreement_overwrite(labels, labels, np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="do not fit"):
        agreement_overwrite(labels, np.full((2, 3), 300), np.ones((2, 3), dtype=bool))


# ------------------------------------------------------------------------------ input validation


def test_input_validation():
    image, probs = two_region_image(), noisy_probs()
    with pytest.raises(ValueError, match="must be uint8"):
        dense_crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError, match="H x W x 3"):
        dense_crf(image[:, :, :2].copy(), probs)
    with pytest.raises(ValueError, match="H x W x 3"):
        dense_crf(image[:, :, 0].copy(), probs)
    with pytest.raises(ValueError, match="C-contiguous"):
        dense_crf(image[:, :, ::-1], probs)
    with pytest.raises(ValueError, match="image is 40x59 but the probabilities are 40x60"):
        dense_crf(np.ascontiguousarray(image[:, 1:]), probs)
    with pytest.raises(ValueError, match=r"\[K, H, W\]"):
        dense_crf(image, probs[0])
    with pytest.raises(ValueError, match="floating point"):
        dense_crf(image, (probs * 100).astype(np.int64))
    with pytest.raises(ValueError, match="non-negative integer"):
        dense_crf(image, probs, iterations=-1)
    bad = probs.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dense_crf(image, bad)


def test_read_only_image_is_accepted():
    image, probs = two_region_image(), noisy_probs()
    expected = dense_crf(image, probs, iterations=2)
    image.flags.writeable = False
    np.testing.assert_array_equal(dense_crf(image, probs, iterations=2), expected)
