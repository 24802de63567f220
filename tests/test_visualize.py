"""Pictures: palette colouring, overlay colours at known pixels, panel layout, PNG files."""

import os

import cv2
import numpy as np
import pytest

from mask2former.utils.visualize import (
    boundary_mask,
    label_map_to_color,
    make_panel,
    overlay,
    plot_confusion_matrix,
    save_panel,
)

PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
NAMES = ["Background", "Paper", "Metal"]
IMAGE_COLOR = (100, 50, 200)


def square_label_map(ignore=255):
    """8x8 background with a 4x4 Paper square at rows/cols 2..5 and one ignore pixel at (7, 7)."""
    label = np.zeros((8, 8), dtype=np.int64)
    label[2:6, 2:6] = 1
    label[7, 7] = ignore
    return label


def constant_image(h=8, w=8):
    return np.full((h, w, 3), IMAGE_COLOR, dtype=np.uint8)


def test_label_map_to_color():
    color = label_map_to_color(square_label_map(), PALETTE, unknown_color=(9, 8, 7))
    assert color.shape == (8, 8, 3) and color.dtype == np.uint8
    assert tuple(color[0, 0]) == (0, 0, 0)
    assert tuple(color[3, 3]) == (255, 0, 0)
    assert tuple(color[7, 7]) == (9, 8, 7)  # ignore label: outside the palette
    with pytest.raises(ValueError):
        label_map_to_color(square_label_map(), [(0, 0)])


def test_boundary_mask_hand_example():
    edge = boundary_mask(square_label_map())
    # The square's outer ring and the background ring around it; not the square's inside.
    assert edge[2, 2] and edge[5, 3] and edge[1, 2] and edge[3, 6]
    assert not edge[3, 3] and not edge[4, 4] and not edge[0, 0] and not edge[1, 1]
    assert edge[7, 7] and edge[6, 7] and edge[7, 6]  # around the ignore pixel
    assert edge.sum() == 12 + 16 + 3


def test_overlay_colours_at_known_pixels():
    out = overlay(constant_image(), square_label_map(), PALETTE, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    assert tuple(out[0, 0]) == (50, 25, 100)  # background: half black; 0.5*100 etc.
    assert tuple(out[3, 3]) == (178, 25, 100)  # inside the square: 177.5 rounds up
    assert tuple(out[2, 2]) == (255, 0, 0)  # boundary: class colour, full opacity
    assert tuple(out[1, 2]) == (0, 0, 0)  # background side of the boundary
    assert tuple(out[7, 7]) == IMAGE_COLOR  # ignore label: untouched, even on a boundary

    plain = overlay(
        constant_image(), square_label_map(), PALETTE, alpha=0.25, draw_boundaries=False
    )
    assert tuple(plain[2, 2]) == (139, 38, 150)  # 0.75*(100,50,200) + 0.25*(255,0,0)
    assert tuple(plain[1, 2]) == (75, 38, 150)  # 37.5 rounds up to 38
    with pytest.raises(ValueError, match="sizes differ"):
        overlay(constant_image(4, 4), square_label_map(), PALETTE)


def test_panel_layout_and_legend():
    h, w = 20, 200
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    gt = np.zeros((h, w), dtype=np.int64)
    gt[5:15, 10:50] = 1
    pred = np.zeros((h, w), dtype=np.int64)
    pred[5:15, 12:50] = 1
    pred[0, 0] = 255  # outside the palette: not in the legend
    panel = make_panel(image, gt, pred, PALETTE, NAMES)
    # Two short names fit on one legend row: 18 px per row + 4 px padding.
    assert panel.shape == (h + 22, 3 * w, 3)
    np.testing.assert_array_equal(panel[:h, :w], image)
    np.testing.assert_array_equal(panel[:h, w : 2 * w], overlay(image, gt, PALETTE))
    np.testing.assert_array_equal(panel[:h, 2 * w :], overlay(image, pred, PALETTE))
    # First legend entry (Background): black frame, then the swatch colour; second: Paper red.
    assert tuple(panel[h + 4, 4]) == (0, 0, 0)
    legend = panel[h:]
    red = np.all(legend == (255, 0, 0), axis=-1)
    assert red.sum() == 10 * 10  # exactly one Paper swatch (10x10 inside its frame)
    assert not np.all(legend == (0, 255, 0), axis=-1).any()  # Metal absent -> not listed

    no_gt = make_panel(image, None, pred, PALETTE, NAMES)
    assert no_gt.shape == (h + 22, 2 * w, 3)


def test_save_panel_writes_png(tmp_path):
    image = constant_image()
    path = tmp_path / "pictures" / "panel.png"
    panel = save_panel(str(path), image, square_label_map(), square_label_map(), PALETTE, NAMES)
    read = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(read, panel)
    assert os.listdir(path.parent) == ["panel.png"]  # no temporary file left


def test_plot_confusion_matrix_png(tmp_path):
    def grey_pixels(picture):
        return int(np.all(picture == 208, axis=-1).sum())  # "#d0d0d0": rows without GT

    cm = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 3]])  # class 1 has no GT pixels: grey row
    path = tmp_path / "cm.png"
    plot_confusion_matrix(cm, NAMES, str(path), title="test")
    picture = cv2.imread(str(path))
    assert picture is not None and picture.shape[0] >= 300 and picture.shape[1] >= 300
    assert grey_pixels(picture) > 5000  # a whole row of cells
    assert os.listdir(tmp_path) == ["cm.png"]
    cm[1, 1] = 1
    plot_confusion_matrix(cm, NAMES, str(path))
    assert grey_pixels(cv2.imread(str(path))) < 100
    with pytest.raises(ValueError, match="does not match"):
        plot_confusion_matrix(cm, NAMES[:2], str(tmp_path / "bad.png"))
    assert not (tmp_path / "bad.png").exists()
