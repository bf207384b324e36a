"""The Sessa IR: a typed SSA graph of attention, feedback and scan ops and the ordinary ops around them."""
from .graph import Graph, Node, Value
from .ops import OPS, ArgRef, OpDef
from . import ops_chunked  # noqa: F401  (registers the blocked core ops: feedback_lse, feedback_chunked, ...)
from . import ops_fused  # noqa: F401  (registers `fused`: a group of ops one generated kernel computes)
from .text import parse, print_graph
from .types import DType, TensorType, sym
from .verify import verify_graph, verify_node

__all__ = ["Graph", "Node", "Value", "OPS", "OpDef", "ArgRef", "parse", "print_graph", "DType",
           "TensorType", "sym", "verify_graph", "verify_node"]
