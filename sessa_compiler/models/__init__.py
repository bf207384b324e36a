"""Eager reference models (the oracle every backend is checked against).

See shared/SESSA_SPEC.md for the numerical contract.
"""

from .decoder import Decoder
from .mamba import MambaLayer
from .scan_op import selective_scan, selective_scan_with_state
from .sessa import SessaLayer, SessaMixer
from .transformer import TransformerLayer

__all__ = [
    "Decoder",
    "MambaLayer",
    "SessaLayer",
    "SessaMixer",
    "TransformerLayer",
    "selective_scan",
    "selective_scan_with_state",
]
