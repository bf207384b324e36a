"""The Triton backend: chunked/fused IR -> generated Triton kernels for attention, feedback and scan.

Importing this package does not import triton; ``TritonBackend`` does (lazily, via get_backend).
The blocked ops' meaning lives in ``sessa_compiler/semantics/``, which the eager backend runs.
"""


def __getattr__(name):
    if name in ("TritonBackend", "TritonProgram"):
        from .backend import check_triton

        check_triton()
        from . import backend

        return getattr(backend, name)
    raise AttributeError(name)


__all__ = ["TritonBackend", "TritonProgram"]
