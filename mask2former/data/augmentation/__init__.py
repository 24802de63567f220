"""Training-time data: the semantic-segmentation train mapper (:mod:`.mapper`) and the
copy-paste bank it samples from (:mod:`.copy_paste`)."""

from .mapper import MaskFormerSemanticDatasetMapper

__all__ = ["MaskFormerSemanticDatasetMapper"]
