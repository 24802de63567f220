"""Transformer decoders."""
