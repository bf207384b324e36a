"""sessa_compiler: compile Sessa models (and Transformer / Mamba baselines) into fast, exportable kernels."""
from .errors import (InputError, IRError, ParseError, SessaCompilerError, TraceError, UnsupportedError,
                     ValidationError)
from .api import CompiledModule, compile
from .frontend import trace
from .ir import parse

__version__ = "0.1.0"

__all__ = ["compile", "CompiledModule", "trace", "parse", "SessaCompilerError", "IRError", "ParseError", "TraceError", "UnsupportedError",
           "InputError", "ValidationError", "__version__"]
