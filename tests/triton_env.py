"""Import this before triton in tests that run Triton kernels on CPU tensors.

Triton reads TRITON_INTERPRET when triton.language is first imported, so it is set here, first.
TRITON_DEFAULT_FP_FUSION=1 makes triton 3.6, 3.9 and 3.10 behave alike (see shared/notes/triton.md).
``require_interpreter()`` skips a test module when triton is missing or was already imported with
the interpreter off (then kernels cannot run on CPU tensors in this process).
"""
import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def require_interpreter():
    import pytest

    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    from sessa_compiler.backends.triton.backend import interpreter_ready

    if not interpreter_ready():
        pytest.skip("triton was imported with TRITON_INTERPRET off before these tests: run them in their own process")
