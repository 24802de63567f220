"""ResizeShortestEdgeCrop against Detectron2's ResizeShortestEdge then crop, applied one after
the other: the same random draws (same crop window, same label map bit for bit) and the same
image up to the rounding of the bilinear filter's coefficients."""

import numpy as np
import pytest
from detectron2.data import transforms as T

from mask2former.data.augmentation.resize_crop import ResizedCropTransform, ResizeShortestEdgeCrop


def photo_like(height, width, seed=0):
    """A textured uint8 RGB image: smooth gradients plus noise (every value range in use)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def label_map(height, width):
    """Blocks of 7 labels plus a 255 (ignored) band: crops see varying category areas."""
    y, x = np.mgrid[0:height, 0:width]
    labels = ((x // 23 + 3 * (y // 17)) % 7).astype(np.uint8)
    labels[:, : width // 6] = 255
    return labels


def apply_both(resize, crop, image, sem_seg, seed):
    """(reference AugInput, fused AugInput, reference next draw, fused next draw)."""
    outputs = []
    for augs in ([resize, crop], [ResizeShortestEdgeCrop(resize, crop)]):
        np.random.seed(seed)
        aug_input = T.AugInput(image.copy(), sem_seg=sem_seg.copy())
        T.AugmentationList(augs)(aug_input)
        outputs.append((aug_input, np.random.rand()))
    (ref, ref_next), (fused, fused_next) = outputs
    return ref, fused, ref_next, fused_next


@pytest.mark.parametrize("max_area", [1.0, 0.4])
@pytest.mark.parametrize("size", [(96, 128), (130, 97)])
def test_same_draws_and_pixels_as_resize_then_crop(max_area, size):
    image, sem_seg = photo_like(*size), label_map(*size)
    resize = T.ResizeShortestEdge((48, 260), 400, "range")
    crop = T.RandomCrop_CategoryAreaConstraint("absolute", (64, 64), max_area, 255)
    differing = total = 0
    for seed in range(40):
        ref, fused, ref_next, fused_next = apply_both(resize, crop, image, sem_seg, seed)
        assert ref_next == fused_next  # the same number of draws from NumPy's generator
        assert fused.sem_seg.dtype == ref.sem_seg.dtype
        np.testing.assert_array_equal(fused.sem_seg, ref.sem_seg)  # same window, exact labels
        assert fused.image.shape == ref.image.shape and fused.image.dtype == np.uint8
        diff = np.abs(fused.image.astype(int) - ref.image.astype(int))
        assert diff.max() <= 2, seed
        differing += int((diff > 0).sum())
        total += diff.size
    assert differing / total < 0.02


def test_crop_larger_than_the_resized_image_keeps_it_whole():
    image, sem_seg = photo_like(60, 80), label_map(60, 80)
    resize = T.ResizeShortestEdge((30, 40), 1000, "range")
    crop = T.RandomCrop_CategoryAreaConstraint("absolute", (64, 64), 1.0, 255)
    for seed in range(5):
        ref, fused, _, _ = apply_both(resize, crop, image, sem_seg, seed)
        assert fused.image.shape[:2] == ref.image.shape[:2] == ref.sem_seg.shape
        np.testing.assert_array_equal(fused.sem_seg, ref.sem_seg)
        assert np.abs(fused.image.astype(int) - ref.image.astype(int)).max() <= 2


def test_non_uint8_and_single_channel_images():
    resize = T.ResizeTransform(50, 70, 101, 141)
    crop = T.CropTransform(13, 20, 64, 48)
    fused = ResizedCropTransform(resize, crop)
    floats = photo_like(50, 70).astype(np.float32) / 255
    # float images go through the reference path: equal
    np.testing.assert_array_equal(
        fused.apply_image(floats), crop.apply_image(resize.apply_image(floats))
    )
    gray = photo_like(50, 70)[:, :, :1]
    out = fused.apply_image(gray)
    ref = crop.apply_image(resize.apply_image(gray))
    assert out.shape == ref.shape == (48, 64, 1)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 2
    coords = np.array([[10.0, 5.0], [69.0, 49.0]])
    np.testing.assert_allclose(
        fused.apply_coords(coords.copy()), crop.apply_coords(resize.apply_coords(coords.copy()))
    )
    with pytest.raises(ValueError, match="size"):
        fused.apply_image(photo_like(40, 70))


def test_no_resize_draw_still_crops():
    # short edge 0 is Detectron2's "no resize": the crop alone, as before
    image, sem_seg = photo_like(90, 90), label_map(90, 90)
    resize = T.ResizeShortestEdge([0], 1000, "choice")
    crop = T.RandomCrop_CategoryAreaConstraint("absolute", (32, 32), 1.0, 255)
    ref, fused, ref_next, fused_next = apply_both(resize, crop, image, sem_seg, 3)
    assert ref_next == fused_next
    np.testing.assert_array_equal(fused.image, ref.image)
    np.testing.assert_array_equal(fused.sem_seg, ref.sem_seg)


def test_plain_random_crop_draws_as_resize_then_crop():
    image, sem_seg = photo_like(96, 128), label_map(96, 128)
    resize = T.ResizeShortestEdge((48, 260), 400, "range")
    for seed in range(10):
        ref, fused, ref_next, fused_next = apply_both(
            resize, T.RandomCrop("absolute", (64, 64)), image, sem_seg, seed
        )
        assert ref_next == fused_next
        np.testing.assert_array_equal(fused.sem_seg, ref.sem_seg)
        assert np.abs(fused.image.astype(int) - ref.image.astype(int)).max() <= 2
