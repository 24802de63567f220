"""3x3 mode filter: brute-force agreement, ties keep the centre, ignore label."""

from collections import Counter

import numpy as np
import pytest

from mask2former.postprocess.mode_filter import mode_filter


def brute_force(label, ignore_label=None):
    h, w = label.shape
    out = label.copy()
    for i in range(h):
        for j in range(w):
            if label[i, j] == ignore_label:
                continue
            votes = Counter(
                int(label[a, b])
                for a in range(max(i - 1, 0), min(i + 2, h))
                for b in range(max(j - 1, 0), min(j + 2, w))
                if label[a, b] != ignore_label
            )
            top = max(votes.values())
            winners = [v for v, n in votes.items() if n == top]
            out[i, j] = winners[0] if len(winners) == 1 else label[i, j]
    return out


@pytest.mark.parametrize("ignore_label", [None, 3])
def test_matches_brute_force(ignore_label):
    rng = np.random.default_rng(0 if ignore_label is None else 1)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(1, 16, 2))
        label = rng.integers(0, 4, (h, w)).astype(np.uint8)
        np.testing.assert_array_equal(
            mode_filter(label, ignore_label), brute_force(label, ignore_label)
        )


def test_ties_keep_centre_and_noise_is_removed():
    label = np.zeros((5, 5), dtype=np.int32)
    label[2, 2] = 7  # isolated pixel: removed
    out = mode_filter(label)
    assert out.dtype == np.int32 and (out == 0).all()
    tie = np.array([[1, 1, 1], [2, 9, 2], [2, 1, 2]])  # centre sees 4 ones, 4 twos, itself
    assert mode_filter(tie)[1, 1] == 9
    corner = np.array([[5, 1], [1, 6]])  # 2 ones vs 1 each: unique mode wins everywhere
    assert (mode_filter(corner) == 1).all()
    with pytest.raises(ValueError, match="H x W"):
        mode_filter(np.zeros((2, 2, 3)))


def test_ignore_pixels_do_not_vote_or_change():
    label = np.full((4, 4), 255, dtype=np.uint8)
    label[1, 1] = 2
    out = mode_filter(label, ignore_label=255)
    np.testing.assert_array_equal(out, label)
    assert (mode_filter(label)[1:3, 1:3] == 255).all()  # without ignore, 255 is a label
