"""The Triton backend: chunked/fused IR -> generated Triton kernels for attention, feedback and scan.

Importing this package does not import triton; ``TritonBackend`` does (lazily, via get_backend).
``blocked_ref`` (torch implementations of the blocked ops, registered into the eager backend) needs
only torch.
"""


def __getattr__(name):
    if name in ("TritonBackend", "TritonProgram"):
        from .backend import check_triton

        check_triton()
        from . import backend

        return getattr(backend, name)
    raise AttributeError(name)


__all__ = ["TritonBackend", "TritonProgram"]
