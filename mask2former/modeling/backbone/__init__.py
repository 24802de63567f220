"""Swin backbone."""
