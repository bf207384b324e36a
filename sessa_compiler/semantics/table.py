"""SEMANTICS: every IR op's meaning, by op name, as one plain dict built from the modules of this package.

    core ops      (attention, feedback, tri_solve, scan, rope)       core.py
    blocked forms (feedback_lse, ..., scan_chunked)                  chunked.py
    ordinary ops  (linear, add, reshape, sum, arange, fallback, ...) ordinary.py
    fused         a group's body, run op by op                       interpret.py (run_graph)

Each entry is ``fn(*operands, **attrs)`` with resolved attributes (see ``interpret.resolve``).
tests/test_ir.py checks that every op in ``ir.OPS`` has an entry.
"""
from __future__ import annotations

from ..ir.ops_fused import parse_body
from . import chunked, core
from .ordinary import ORDINARY


# the blocked forms the chunking passes introduce (ir/ops_chunked.py)
CHUNKED_SEMANTICS = {"feedback_lse": chunked.feedback_lse, "feedback_diag_inverse": chunked.feedback_diag_inverse,
                     "feedback_chunked": chunked.feedback_chunked, "scan_chunked": chunked.scan_chunked}


def fused(*operands, group, kernel, body, bytes_saved=None):
    """A fused group (ir/ops_fused.py) means its body's ops, one by one."""
    from .interpret import run_graph  # interpret looks ops up in this table

    outs = run_graph(parse_body(body), list(operands), {})
    return tuple(outs) if len(outs) != 1 else outs[0]


SEMANTICS: dict = {**core.CORE_SEMANTICS, **CHUNKED_SEMANTICS, **ORDINARY, "fused": fused}
