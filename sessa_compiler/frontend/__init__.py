"""The frontend: torch.export -> IR lowering and the recognisers for attention, feedback and scan."""
from .trace import trace, trace_with_report

__all__ = ["trace", "trace_with_report"]
