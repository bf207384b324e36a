"""Every IR op's meaning, in plain torch, in one place: importing this package gives all of them.

    SEMANTICS            op name -> fn(*operands, **attrs)          table.py (a plain dict, no registration)
    run_graph, run_node  the interpreter over SEMANTICS             interpret.py
    attention_ref, ...   the core ops' definitions                  core.py
    chunked.*            the blocked forms the chunking passes make chunked.py

The eager backend (backends/eager.py) runs graphs with it; the frontend's probes and every backend's
tests compare against it. It imports only torch and the IR.
"""
from .core import attention_ref, feedback_ref, rope_ref, scan_ref, tri_solve_ref, tri_solve_rows
from .interpret import FACTORIES, bind_symbols, resolve, run_graph, run_node, symbolic_binding
from .ordinary import fill_refs, resolve_target
from .table import SEMANTICS

__all__ = ["SEMANTICS", "run_graph", "symbolic_binding", "run_node", "bind_symbols", "resolve", "FACTORIES", "resolve_target",
           "fill_refs", "attention_ref", "feedback_ref", "rope_ref", "scan_ref", "tri_solve_ref", "tri_solve_rows"]
