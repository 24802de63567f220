"""ColorAugSSDLookupTransform against Detectron2's ColorAugSSDTransform: the same bytes from
the same random draws, in both image formats."""

import random

import numpy as np
import pytest
from detectron2.projects.point_rend import ColorAugSSDTransform

from mask2former.data.augmentation.color import ColorAugSSDLookupTransform


@pytest.mark.parametrize("img_format", ["RGB", "BGR"])
def test_same_bytes_and_draws_as_detectron2(img_format):
    rng = np.random.default_rng(0)
    # every byte value in every channel, plus a textured part
    image = np.concatenate(
        [
            np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2).repeat(4, 0),
            rng.integers(0, 256, (60, 256, 3), dtype=np.uint8),
        ]
    )
    reference = ColorAugSSDTransform(img_format)
    lookup = ColorAugSSDLookupTransform(img_format)
    changed = 0
    for seed in range(150):
        random.seed(seed)
        expected = reference.apply_image(image.copy())
        expected_next = random.random()
        random.seed(seed)
        got = lookup.apply_image(image.copy())
        assert random.random() == expected_next  # the same draws, in the same order
        assert got.dtype == np.uint8 and got.shape == image.shape
        np.testing.assert_array_equal(got, expected, err_msg=f"seed {seed}")
        changed += not np.array_equal(got, image)
    assert changed > 100  # the jitter does change most images


def test_rejects_non_uint8():
    with pytest.raises(TypeError, match="uint8"):
        ColorAugSSDLookupTransform("RGB").apply_image(np.zeros((4, 4, 3), np.float32))
