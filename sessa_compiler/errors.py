"""The error hierarchy: every error the compiler raises on purpose is a SessaCompilerError.

Messages name the op (or the stage), what was expected and what came, and what to do.
"""


class SessaCompilerError(Exception):
    """Base class of every error raised on purpose by sessa_compiler."""


class IRError(SessaCompilerError):
    """A malformed IR graph or op: raised by the verifier."""


class ParseError(IRError):
    """IR text that does not parse."""


class TraceError(SessaCompilerError):
    """torch.export or the lowering of its graph to the IR failed."""


class DataDependentBranch(TraceError):
    """torch.export met Python control flow on a tensor's value (``if torch.rand([]) < p:``): no one graph is the
    module. A compiled module runs such calls on the original module instead; exports raise it."""


class UnsupportedError(SessaCompilerError):
    """A feature, op or backend that is not available (yet, or on this machine)."""


class InputError(SessaCompilerError, ValueError):
    """Inputs of the wrong rank, shape, dtype or device given to a compiled module."""


class ValidationError(SessaCompilerError):
    """A compiled module's outputs differ from the original module beyond the spec's tolerance."""


class ConfigError(SessaCompilerError, ValueError):
    """A setting that cannot be used: an unknown compile option, a cache directory that is a file, a bad
    command-line value. The message names the setting, what it must be and what was given."""


class ArtifactError(SessaCompilerError, OSError):
    """An exported artifact (a TVM export directory, an ONNX file) that is missing or not what it should be."""
