"""Cost of the first call with the default backend on CPU (auto -> TVM): trace, TVM build, then a call.

    python3 benchmarks/first_call.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sessa_compiler as sc  # noqa: E402
from sessa_compiler.models import SessaLayer  # noqa: E402


def main():
    m = SessaLayer(512, n_heads=8).eval()
    x = torch.randn(1, 64, 512)
    t0 = time.perf_counter()
    c = sc.compile(m, (x,))
    t1 = time.perf_counter()
    with torch.no_grad():
        c(x)
        t2 = time.perf_counter()
        c(x)
        t3 = time.perf_counter()
    print(f"SessaLayer(512, n_heads=8), T=64, backend {c.backend}: trace {t1 - t0:.1f} s, first call {t2 - t1:.1f} s, "
          f"next call {1e3 * (t3 - t2):.1f} ms (load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
