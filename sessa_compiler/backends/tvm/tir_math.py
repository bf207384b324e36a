"""Scalar math for generated kernels: an exp that vectorizes.

LLVM lowers a vector ``exp`` to one libm call per lane (about 6x slower than the polynomial below
on AVX2); softmax-heavy kernels spend much of their time there. float32 uses the Cephes range
reduction plus a degree-6 polynomial (relative error under 1e-7 on [-87, 88]); float64 keeps the
exact libm exp (the float64 tolerance is 1e-10).
"""
from __future__ import annotations

from tvm.script import tirx as T

# A stand-in for -inf in masked logits: finite, so max/exp never see inf - inf.
MASKED = -1.0e30


def make_exp(dtype: str):
    if dtype != "float32":
        return T.exp

    def fast_exp(x):
        xc = T.max(T.min(x, T.float32(88.3762626647950)), T.float32(-88.3762626647949))
        n = T.floor(xc * T.float32(1.44269504088896341) + T.float32(0.5))
        r = xc - n * T.float32(0.693359375) + n * T.float32(2.12194440e-4)
        p = (((((T.float32(1.9875691500e-4) * r + T.float32(1.3981999507e-3)) * r + T.float32(8.3334519073e-3)) * r
               + T.float32(4.1665795894e-2)) * r + T.float32(1.6666665459e-1)) * r + T.float32(5.0000001201e-1)) \
            * (r * r) + r + T.float32(1.0)
        scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
        # below -87.3 the result is (sub)normal or zero: return exactly zero (masked logits land here)
        return T.Select(x < T.float32(-87.0), T.float32(0.0), p * scale)

    return fast_exp
