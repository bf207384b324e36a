"""The sessa-compiler command line on a small model."""
import subprocess
import sys

import pytest
import torch

from sessa_compiler.cli import main

SMALL = ["--D", "16", "--heads", "2", "--T", "8", "--batch", "1"]


@pytest.mark.parametrize("command", ["compile", "explain", "export", "tune", "bench"])
def test_help_of_every_subcommand(command):
    out = subprocess.run([sys.executable, "-m", "sessa_compiler.cli", command, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and f"usage: sessa-compiler {command}" in out.stdout


def test_compile_validates_and_writes_ir(tmp_path, capsys):
    ir = tmp_path / "layer.ir"
    assert main(["compile", "--model", "sessa", *SMALL, "--backend", "eager", "--ir", str(ir)]) == 0
    out = capsys.readouterr().out
    assert "validation passed" in out and "T=17" in out
    import sessa_compiler as sc

    text = ir.read_text()
    assert "= attention(" in text and str(sc.parse(text)) == text


def test_explain_prints_recognised_ops_and_ir(capsys):
    assert main(["explain", "--model", "decoder", "--layers", "SM", *SMALL, "--backend", "eager"]) == 0
    out = capsys.readouterr().out
    assert "core ops: attention x1, feedback x1, scan x1" in out and "graph Decoder(" in out


def test_weights_and_foreign_module(tmp_path, capsys):
    from styles.sdpa_style import SdpaSessaLayer

    torch.manual_seed(5)
    path = tmp_path / "w.pt"
    torch.save(SdpaSessaLayer(16, n_heads=2).state_dict(), path)
    argv = ["compile", "--module", "styles.sdpa_style:SdpaSessaLayer", "--kwargs", '{"D": 16, "n_heads": 2}',
            "--weights", str(path), "--T", "8", "--backend", "eager"]
    assert main(argv) == 0
    assert "validation passed" in capsys.readouterr().out


def test_foreign_module_taking_token_ids(capsys):
    # a --module whose forward takes token ids (it holds an nn.Embedding): the CLI builds ids, not floats
    argv = ["compile", "--module", "styles.flat_lm_style:FlatSessaLM", "--kwargs", '{"max_len": 64}', "--T", "8",
            "--backend", "eager"]
    assert main(argv) == 0
    assert "validation passed" in capsys.readouterr().out


def test_foreign_module_taking_two_inputs_is_a_one_line_error(capsys):
    # neither token ids nor [B, T, D] floats run it: the error says what the CLI tried and why each failed
    argv = ["compile", "--module", "styles.cached_table_lm_style:CachedTableBlock", "--T", "8", "--backend", "eager"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "none it can build runs" in err and "float [B, T, 32]" in err and "position_ids" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bench_writes_table_and_plot(tmp_path, capsys):
    png = tmp_path / "bench.png"
    assert main(["bench", "--model", "sessa", *SMALL, "--backends", "eager", "--lengths", "8,16", "--repeats", "3",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| T | eager module (ms) | eager (ms) | eager speed-up |" in out and png.stat().st_size > 1000
    rows = [line for line in out.splitlines() if line.startswith(("| 8 |", "| 16 |"))]
    assert len(rows) == 2 and all("(±" in r and (r.endswith("x |") or r.endswith("spread too large |")) for r in rows)


def test_errors_are_reported_not_raised(capsys):
    assert main(["compile", "--model", "sessa", *SMALL, "--backend", "no-such-backend"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'no-such-backend'" in err and "'tvm'" in err and len(err.strip().splitlines()) == 1


# Every user error: one line on stderr naming the input, exit status 2, no traceback.
USER_ERRORS = {
    "module not importable": (["compile", "--module", "no_such_package.layers:Layer"], "cannot import 'no_such_package.layers'"),
    "module without class": (["compile", "--module", "json"], "expects package.module:Class"),
    "module attribute missing": (["compile", "--module", "json:NoSuchClass"], "json has no attribute 'NoSuchClass'"),
    "not a module class": (["compile", "--module", "json:JSONDecoder"], "JSONDecoder is not a torch.nn.Module class"),
    "bad JSON kwargs": (["compile", "--module", "styles.sdpa_style:SdpaSessaLayer", "--kwargs", "{D: 16}"],
                        "--kwargs is not valid JSON"),
    "kwargs not an object": (["compile", "--module", "styles.sdpa_style:SdpaSessaLayer", "--kwargs", "[16]"],
                             "--kwargs must be a JSON object"),
    "missing weights": (["compile", *SMALL, "--weights", "no/such/weights.pt"], "--weights 'no/such/weights.pt': no such file"),
    "impossible heads": (["compile", "--D", "16", "--heads", "5"], "n_heads=5"),
    "impossible kv heads": (["explain", "--D", "16", "--heads", "4", "--kv-heads", "3"], "--kv-heads"),
    "zero width": (["compile", "--D", "0"], "argument --D: expected a positive integer, got 0"),
    "output directory is a file": (["export", "onnx", "tests/conftest.py/model.onnx", *SMALL], "is not a directory"),
    "unknown bench backend": (["bench", *SMALL, "--backends", "tvm,foo"], "unknown backend 'foo'"),
    "bad lengths": (["bench", *SMALL, "--backends", "eager", "--lengths", "8,x"], "--lengths"),
    "unknown tune backend": (["tune", *SMALL, "--backend", "cuda"], "invalid choice: 'cuda'"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_are_one_line_and_exit_status_2(case, capsys):
    argv, expected = USER_ERRORS[case]
    assert main(argv) == 2
    out = capsys.readouterr()
    assert expected in out.err, out.err
    assert len(out.err.strip().splitlines()) == 1 and "Traceback" not in out.err


def test_weights_that_do_not_fit_are_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "w.pt"
    torch.save({"nonsense": torch.zeros(2)}, path)
    assert main(["compile", *SMALL, "--weights", str(path)]) == 2
    err = capsys.readouterr().err
    assert "does not load into SessaLayer" in err and len(err.strip().splitlines()) == 1


def test_version_lists_every_component(capsys):
    import importlib.metadata as md

    import sessa_compiler as sc

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"sessa-compiler {sc.__version__}\n")
    for name in ("torch", "numpy", "triton", "apache-tvm", "onnx", "onnxscript", "onnxruntime"):
        assert f"  {name} {md.version(name)}\n" in out, name


def test_help_and_version_answer_fast_without_importing_torch():
    """--help and --version import neither torch nor the compiler (a fresh interpreter, timed)."""
    probe = ("import sys, time; t = time.perf_counter(); from sessa_compiler.cli import main\n"
             "for argv in (['--help'], ['--version'], ['export', '--help']):\n"
             "    try: main(argv)\n"
             "    except SystemExit: pass\n"
             "print('SECONDS', time.perf_counter() - t, 'HEAVY', sorted(m for m in ('torch', 'numpy', "
             "'sessa_compiler.api') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seconds, heavy = out.stdout.split("SECONDS ")[1].split(" HEAVY ")
    assert heavy.strip() == "[]", heavy
    assert float(seconds) < 0.5, seconds  # importing torch alone takes 1.5 s or more here


def test_help_shows_every_default_once(capsys):
    from sessa_compiler.cli import parser

    for name, sub in parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.dest in ("help",) or not action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings} has no help text"
        text = " ".join(sub.format_help().split())
        assert "(default: " in text and "(default: None)" not in text, name
        assert text.count("(default: every installed backend)") == (name == "bench"), name
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert text.count(f"(default: {action.default})") >= 1, (name, action.dest)
        if name in ("compile", "explain", "tune"):
            assert "--backend {auto," in text  # choices, listed in the usage


def test_export_creates_the_directory_and_reports_inputs_dims_and_validation(tmp_path, capsys):
    path = tmp_path / "new" / "dir" / "model.onnx"
    assert main(["export", "onnx", str(path), *SMALL]) == 0
    out = capsys.readouterr().out
    assert path.is_file() and f"created directory {path.parent}" in out
    assert "inputs: x [B, T, 16]" in out and "outputs: " in out, out
    assert "dynamic dims: B, T" in out
    assert "validated in onnxruntime against the module on 2 input sets" in out and "max error" in out


def test_tune_defaults_to_the_backend_this_device_runs():
    from sessa_compiler.cli import default_tune_backend, parser

    assert parser().parse_args(["tune"]).backend == "auto"
    assert default_tune_backend() == ("triton" if torch.cuda.is_available() else "tvm")


def test_explain_reports_what_will_run(capsys):
    """With the default backend (auto) on CPU, explain reports the TVM program that the first call runs
    (before, it said the linears ran on torch's BLAS until a call had been made)."""
    assert main(["explain", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "mode: whole graph in TVM" in out and "generated TVM matmul kernels" in out


def test_console_script_is_installed():
    import sysconfig
    from pathlib import Path

    script = Path(sysconfig.get_path("scripts")) / "sessa-compiler"
    assert script.exists(), f"pip install did not create {script}"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "compile,explain,export,tune,bench" in out.stdout.replace(" ", "")


def test_the_package_loads_lazily_only_when_torch_is_not_imported_yet():
    """`import torch, sessa_compiler` registers the custom ops at once (as always); `import sessa_compiler`
    alone imports no torch until a name of the package is used."""
    probe = ("import sys\n"
             "import sessa_compiler as sc\n"
             "print('alone', 'torch' in sys.modules)\n"
             "sc.compile\n"
             "import torch\n"
             "print('used', hasattr(torch.ops.sessa_compiler, 'feedback'))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["alone", "False", "used", "True"], out.stderr
    probe = ("import sys, torch, sessa_compiler\n"
             "print(hasattr(torch.ops.sessa_compiler, 'attention'), 'sessa_compiler.dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True"], out.stderr
