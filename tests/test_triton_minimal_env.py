"""The GPU machines have only torch (with its own dependencies), triton and numpy: no platformdirs,
tqdm, onnx, onnxscript, onnxruntime, tvm, matplotlib, hypothesis or pytest. In a subprocess where
those cannot be imported, the GPU check script runs its whole flow on CPU (`--smoke`: Triton's
interpreter, tiny sizes): `sessa_compiler` imports, compiles Sessa layers with the Triton backend in
fp32 and bf16 and matches float64, the feedback op matches its reference, every timing section runs,
fla is reported as not run, and the results table is written."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_ON_GPU_MACHINE = ("platformdirs", "tqdm", "onnx", "onnxscript", "onnxruntime", "tvm", "tvm_ffi", "matplotlib",
                      "hypothesis", "pytest", "transformers", "einops", "fla")

SCRIPT = textwrap.dedent("""
    import runpy, sys
    for name in {blocked!r}:
        sys.modules[name] = None   # `import name` raises ModuleNotFoundError; find_spec(name) is None
    from sessa_compiler.persistent_cache import cache_dir
    assert cache_dir().name == "sessa_compiler"   # without platformdirs
    sys.argv = ["gpu_check.py", "--smoke", "--out", {out!r}]
    runpy.run_path({script!r}, run_name="__main__")
""")


def test_gpu_check_runs_with_only_torch_triton_numpy(tmp_path):
    out = tmp_path / "results.md"
    env = dict(os.environ, PYTHONPATH=ROOT, SESSA_COMPILER_KERNEL_DIR=str(tmp_path / "kernels"), HOME=str(tmp_path))
    for var in ("SESSA_COMPILER_CACHE_DIR", "XDG_CACHE_HOME"):
        env.pop(var, None)
    script = SCRIPT.format(blocked=NOT_ON_GPU_MACHINE, out=str(out),
                           script=os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert not [r for r in rows if "FAILED" in r[1]], out.read_text()
    checks = [r for r in rows if r[0] == "| correctness"]
    # the feedback op (one pass, lse-first fallback, the one-pass lse) in f32 and bf16, two layers
    assert len(checks) == 8 and all(r[3].startswith("PASS") for r in checks), checks
    sections = {r[0].strip("| ") for r in rows}
    assert {"device", "correctness", "layer", "train", "feedback", "fla"} <= sections
    grads = [r for r in rows if r[0] == "| train" and r[1].startswith("grads")]
    assert len(grads) == 1 and grads[0][3].startswith("PASS"), grads   # the training step's gradients checked
    assert len([r for r in rows if r[0] == "| train" and "fwd+bwd" in r[1] and r[2].endswith(" ms")]) == 3
    assert any(r[0] == "| fla" and r[2] == "not run" for r in rows)   # fla blocked: reported, not a crash
