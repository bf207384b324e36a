"""Import this before triton in tests that run Triton kernels on CPU tensors.

Triton reads TRITON_INTERPRET when triton.language is first imported, so it is set here, first.
TRITON_DEFAULT_FP_FUSION=1 makes triton 3.6, 3.9 and 3.10 behave alike (see shared/notes/triton.md).
``require_interpreter()`` fails a test module (triton is pinned, so it is always installed) when
triton was already imported with the interpreter off: kernels could not run on CPU tensors.
"""
import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def require_interpreter():
    import pytest

    from sessa_compiler.backends.triton.backend import interpreter_ready

    if not interpreter_ready():
        pytest.fail("triton was imported with TRITON_INTERPRET off before these tests (tests/conftest.py imports "
                    "tests/triton_env first to prevent that): kernels cannot run on CPU tensors in this process")
