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


def test_bench_writes_table_and_plot(tmp_path, capsys):
    png = tmp_path / "bench.png"
    assert main(["bench", "--model", "sessa", *SMALL, "--backends", "eager", "--lengths", "8,16", "--repeats", "1",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| T | eager module (ms) | eager (ms) |" in out and png.stat().st_size > 1000


def test_errors_are_reported_not_raised(capsys):
    assert main(["compile", "--model", "sessa", *SMALL, "--backend", "no-such-backend"]) == 2
    assert "unknown backend 'no-such-backend'" in capsys.readouterr().err


def test_console_script_is_installed():
    import sysconfig
    from pathlib import Path

    script = Path(sysconfig.get_path("scripts")) / "sessa-compiler"
    assert script.exists(), f"pip install did not create {script}"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "compile,explain,export,tune,bench" in out.stdout.replace(" ", "")
