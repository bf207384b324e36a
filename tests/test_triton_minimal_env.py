"""The GPU machines have only torch (with its own dependencies), triton and numpy: no platformdirs,
tqdm, onnx, onnxscript, onnxruntime, tvm, matplotlib, hypothesis or pytest. In a subprocess where
those cannot be imported, ``sessa_compiler`` must import, compile a Sessa layer with the Triton
backend and match the eager module, and the GPU check script must import and build its programs."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_ON_GPU_MACHINE = ("platformdirs", "tqdm", "onnx", "onnxscript", "onnxruntime", "tvm", "tvm_ffi", "matplotlib",
                      "hypothesis", "pytest", "transformers", "einops", "fla")

SCRIPT = textwrap.dedent("""
    import os, sys
    for name in {blocked!r}:
        sys.modules[name] = None   # `import name` raises ModuleNotFoundError; find_spec(name) is None
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import sessa_compiler as sc
    from sessa_compiler.models import SessaLayer
    from sessa_compiler.tolerance import relative_error

    torch.manual_seed(0)
    m = SessaLayer(64, n_heads=2, n_kv_heads=1).eval()
    compiled = sc.compile(m, backend="triton")
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        err = relative_error(compiled(x), m(x))
    assert err < 1e-4, err
    assert sc.tune.cache.cache_dir().name == "sessa_compiler"
    sys.path.insert(0, os.path.join({root!r}, "benchmarks"))
    sys.argv = ["gpu_check.py"]
    import gpu_check
    prog = gpu_check.feedback_kernels(128, "bf16")
    assert prog.kernel_nodes, "the GPU check's feedback program has no kernels"
    try:
        gpu_check.load_fla_solve()
    except ImportError as e:
        print("fla:", e)
    else:
        raise AssertionError("fla was blocked but loaded")
    print("OK", err)
""")


def test_triton_path_needs_only_torch_triton_numpy(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, SESSA_COMPILER_KERNEL_DIR=str(tmp_path / "kernels"))
    env.pop("SESSA_COMPILER_CACHE_DIR", None)
    env["HOME"] = str(tmp_path)   # where the stand-in for platformdirs puts the cache
    env.pop("XDG_CACHE_HOME", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(blocked=NOT_ON_GPU_MACHINE, root=ROOT)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK" in proc.stdout
