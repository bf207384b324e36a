"""Passes over the IR (one file each)."""
from .simplify import simplify

__all__ = ["simplify"]
