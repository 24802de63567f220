"""Train mapper: the instances list the label values present, ascending (the ignore label
excluded), for uint8, uint16 and int32 label maps."""

import numpy as np
import pytest
from PIL import Image

from mask2former.data.augmentation.mapper import MaskFormerSemanticDatasetMapper


@pytest.mark.parametrize(
    "values, dtype",
    [
        ((0, 3, 9, 255), np.uint8),
        ((2, 300, 1000, 65535), np.uint16),
        ((7, 70000, 2**31 - 1), np.int32),
    ],
)
def test_instances_of_label_values(tmp_path, values, dtype):
    height, width = 12, 16
    label = np.full((height, width), values[-1], dtype=np.int64)
    for i, value in enumerate(values[:-1]):
        label[:, 4 * i : 4 * i + 3] = value
    # PNG holds 8 and 16 bits; a 32-bit label map is a TIFF
    label_file = tmp_path / ("label.tif" if dtype == np.int32 else "label.png")
    Image.fromarray(label.astype(dtype)).save(label_file)
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(tmp_path / "image.png")
    ignore = values[1]  # an ignore label in the middle of the values
    mapper = MaskFormerSemanticDatasetMapper(
        True, augmentations=[], image_format="RGB", ignore_label=ignore, size_divisibility=-1
    )
    out = mapper(
        {
            "file_name": str(tmp_path / "image.png"),
            "sem_seg_file_name": str(label_file),
            "height": height,
            "width": width,
        }
    )
    expected = sorted(v for v in values if v != ignore)
    instances = out["instances"]
    assert instances.gt_classes.tolist() == expected
    for value, mask in zip(expected, instances.gt_masks):
        np.testing.assert_array_equal(mask.numpy(), label == value)
