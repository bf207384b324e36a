"""SEMANTICS: every IR op's meaning, by op name, as one plain dict built from the modules of this package.

    core ops      (attention, feedback, tri_solve, scan, rope)       core.py
    blocked forms (feedback_lse, ..., scan_chunked)                  chunked.py
    ordinary ops  (linear, add, reshape, sum, arange, fallback, ...) ordinary.py
    fused         a group's body, run op by op                       interpret.py (adds it on import)

Each entry is ``fn(*operands, **attrs)`` with resolved attributes (see ``interpret.resolve``).
tests/test_ir.py checks that every op in ``ir.OPS`` has an entry.
"""
from __future__ import annotations

from . import chunked, core
from .ordinary import ORDINARY


# the blocked forms the chunking passes introduce (ir/ops_chunked.py)
CHUNKED_SEMANTICS = {"feedback_lse": chunked.feedback_lse, "feedback_diag_inverse": chunked.feedback_diag_inverse,
                     "feedback_chunked": chunked.feedback_chunked, "scan_chunked": chunked.scan_chunked}


# "fused" (a group's body run op by op) is added by interpret.py, which runs bodies and reads this table;
# the package's __init__ imports interpret, so the table is complete whenever semantics is imported
SEMANTICS: dict = {**core.CORE_SEMANTICS, **CHUNKED_SEMANTICS, **ORDINARY}
