"""The CamVid photos of the shared data folder (next to the checkout), as the tests use them."""

from pathlib import Path

from mask2former.loop import competition

CAMVID_CLASSES = list(competition.CAMVID_CLASSES)  # label values 0..10
CAMVID_UNLABELLED = competition.CAMVID_UNLABELLED  # ignored
CAMVID_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"

__all__ = ["CAMVID_CLASSES", "CAMVID_ROOT", "CAMVID_UNLABELLED"]
