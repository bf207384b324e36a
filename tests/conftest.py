import pathlib
import sys

# tests/ holds helper modules (triton_env) and modules written in deliberately different styles
# (styles/): make them importable.
sys.path.insert(0, str(pathlib.Path(__file__).parent))

import os

# Before anything imports torch (libgomp reads it once, when loaded): torch's OpenMP workers, which also run the TVM
# kernels' parallel loops (backends/tvm/omp_launch.py), spin about 300k iterations (milliseconds) after each parallel
# region by default. With two xdist workers on two cores that spinning takes the other worker's core: 10k iterations
# keep back-to-back regions warm and gave the TVM test files 96 s instead of 110 s (two runs each, 2026-12-06). A
# value set by whoever runs the suite wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# Before anything imports triton: its interpreter must be on for the kernel tests on CPU tensors.
import triton_env  # noqa: E402,F401

# The persistent compile cache is on for the whole run, in a directory of this run shared by the xdist workers: a
# module compiled by several tests (on several backends, in float32 and float64, ...) is traced and recognised once,
# and the suite exercises the cache as users meet it (an entry is used only when its manifest still holds, so every
# test sees exactly what a fresh trace would give). Once a test patches an object with `monkeypatch`, it traces
# afresh (`_fresh_trace_when_patched` below): a patch of this package's own functions is not part of the cache key (the
# package is keyed by its source), so such a test must not be served another test's trace. Tests that check the
# caches themselves use their own cache directory (tests/test_compile_cache.py).
_MADE = None   # the run's directory, when this process chose it (the xdist workers inherit it): removed at the end
if "SESSA_COMPILER_COMPILE_CACHE" not in os.environ:
    os.environ["SESSA_COMPILER_COMPILE_CACHE"] = "1"
    if "SESSA_COMPILER_CACHE_DIR" not in os.environ:
        import tempfile

        _run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
        _MADE = os.environ["SESSA_COMPILER_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                                     f"sessa-compiler-tests-{_run}")
_SHARED = os.environ.get("SESSA_COMPILER_CACHE_DIR")  # the directory the run's tests share


def pytest_unconfigure(config):
    """The run's cache directory goes with the run (a directory the user set is kept)."""
    if _MADE is not None and not hasattr(config, "workerinput"):   # the controller (or the only process)
        import shutil

        shutil.rmtree(_MADE, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_trace_when_patched(request):
    """From the moment a test patches an object through `monkeypatch` (setattr, delattr, setitem, delitem), traced
    graphs are not shared with it: every later compile of the test traces afresh (built TVM libraries are still
    shared: they are keyed by what they compute). Environment variables (setenv) do not count."""
    if "monkeypatch" in request.fixturenames and os.environ.get("SESSA_COMPILER_COMPILE_CACHE") == "1":
        mp = request.getfixturevalue("monkeypatch")
        setitem = mp.setitem
        for name in ("setattr", "delattr", "setitem", "delitem"):
            setattr(mp, name, _fresh_after(setitem, getattr(mp, name)))  # on this instance only
    yield


def _fresh_after(setitem, patch):
    def patched(target, *args, **kwargs):
        # setenv and delenv come through setitem/delitem on os.environ: not a patch of code. A test that checks the
        # caches with its own directory (tests/test_compile_cache.py) keeps them.
        if target is not os.environ and os.environ.get("SESSA_COMPILER_COMPILE_CACHE") == "1" \
                and os.environ.get("SESSA_COMPILER_CACHE_DIR") == _SHARED:
            setitem(os.environ, "SESSA_COMPILER_COMPILE_CACHE", "libraries")  # undone after the test
        return patch(target, *args, **kwargs)
    return patched


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops are much slower with more than one intra-op thread on 2-core machines under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh persistent tuning cache for one test (SESSA_COMPILER_CACHE_DIR)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("SESSA_COMPILER_CACHE_DIR", str(d))
    return d


# `pytest -m smoke`: a quick subset touching every area (IR, models, frontend, passes, each backend, both
# exports, serving, tuning cache, CLI, packaging and layering). Chosen
# here by name so that the list is one place; a name that no longer matches fails the smoke run.
SMOKE = {
    "test_architecture.py": None,  # None: every test of the file
    "test_packaging.py": None,
    "test_ir.py": {"test_round_trip_is_exact", "test_verifier_names_op_and_mismatch", "test_parse_errors_are_clear"},
    "test_models.py": {"test_sessa_float64_matches_spec", "test_sessa_feedback_matters_and_row0_is_plain_attention"},
    "test_frontend.py": {"test_core_ops_are_recognised", "test_unrecognised_ops_fall_back_and_stay_correct"},
    "test_passes.py": {"test_chunk_feedback_golden", "test_simplify_golden", "test_a_pass_that_breaks_the_ir_is_named"},
    "test_compile.py": {"test_validate_passes_and_catches_a_wrong_graph", "test_bad_inputs_get_clear_errors",
                        "test_unknown_backend_is_named"},
    "test_tvm.py": {"test_dynamic_sequence_length_from_one_build"},
    "test_triton_kernels.py": {"test_scan_kernel_associative_tiny", "test_new_sequence_length_reuses_the_kernel"},
    "test_onnx_export.py": {"test_scan_lowering_matches_reference"},
    "test_serving.py": {"test_cache_overflow_is_an_error_before_any_write"},
    "test_tune_cache.py": {"test_round_trip_and_every_key_field_matters", "test_fast_wrong_config_is_never_chosen"},
    "test_robust.py": {"test_a_misspelt_option_names_the_key_and_the_closest_option",
                       "test_load_tvm_on_a_missing_directory_a_file_or_a_foreign_directory"},
    "test_cli.py": {"test_help_and_version_answer_fast_without_importing_torch", "test_user_errors_are_one_line_and_exit_status_2",
                    "test_version_lists_every_component", "test_help_shows_every_default_once"},
}


# Files run first (in this order): each is one long ahead-of-time compile for sm_90 in a subprocess (its tests
# share a module fixture) or one long subprocess. First, they land whole in the first worker's first batch under
# pytest-xdist (a file split between the workers would compute its module fixture twice) and the suite's end is
# short tests that balance the two workers; last in alphabetical order, as before, one worker ran them alone
# while the other sat idle.
HEAVY_FIRST = ("test_triton_backward_static.py", "test_triton_aot.py", "test_triton_static.py",
               "test_triton_minimal_env.py")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the rest keep their order
    found = set()
    for item in items:
        wanted = SMOKE.get(item.path.name, ())
        name = item.originalname if hasattr(item, "originalname") else item.name
        if wanted is None or name in wanted:
            item.add_marker(pytest.mark.smoke)
            found.add((item.path.name, name))
    if config.getoption("markexpr", "") == "smoke" and len(items) > 200:  # the whole suite was collected
        missing = sorted(f"{f}::{n}" for f, names in SMOKE.items() if names for n in names if (f, n) not in found)
        if missing:
            raise pytest.UsageError(f"smoke tests named in tests/conftest.py that do not exist: {missing}")
