"""Mask2Former modeling components; importing registers them."""
