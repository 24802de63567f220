"""The CamVid photos of the shared data folder (next to the checkout), as the tests use them."""

from pathlib import Path

CAMVID_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
# Label values 0..10; 11 is "Unlabelled" (ignored).
CAMVID_CLASSES = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
]
CAMVID_UNLABELLED = 11
