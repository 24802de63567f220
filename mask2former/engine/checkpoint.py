"""Checkpoint loading and saving for this project (being filled in: safe loading, atomic saving)."""
from detectron2.checkpoint import DetectionCheckpointer


class SafeCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that loads only data and writes checkpoints atomically."""
