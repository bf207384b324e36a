"""The tuning cache and the verified search: keys, atomicity, corruption, concurrency, wrong configs."""
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from sessa_compiler.autotune import TunableKernel, TuningCache, TuningError, make_key, shape_class, tune_kernel


@pytest.fixture
def cache(tmp_path):
    return TuningCache(tmp_path)


def key(**kw):
    k = make_key("triton", "feedback[f32,D=64]", "kernel source v1", [{"chunk": 32}, {"chunk": 64}], 1000)
    return replace(k, **kw)


def test_round_trip_and_every_key_field_matters(cache):
    k = key()
    assert cache.get(k) is None
    cache.put(k, {"chunk": 64}, median_ms=1.5, candidates=2)
    assert cache.get(k) == {"chunk": 64}
    for other in (key(device="cuda:NVIDIA H200:sm_90"), key(source_hash="0" * 64), key(space_hash="1" * 64),
                  key(shape="T<=4096"), key(versions={**k.versions, "torch": "9.9"}), key(backend="tvm")):
        assert cache.get(other) is None, other


def test_shape_classes_bucket_sequence_length():
    assert shape_class(1) == shape_class(16) == "T<=16"
    assert shape_class(17) == shape_class(32) == "T<=32"
    assert shape_class(1000) == shape_class(1024) != shape_class(1025)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edit_config", "foreign_key", "empty"])
def test_damaged_or_foreign_entries_are_misses(cache, damage):
    k = key()
    p = cache.put(k, {"chunk": 64})
    text = p.read_text()
    if damage == "truncate":
        p.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        p.write_bytes(b"\x00\xff not json")
    elif damage == "empty":
        p.write_text("")
    else:
        entry = json.loads(text)
        if damage == "edit_config":
            entry["config"] = {"chunk": 16}  # checksum no longer matches
        else:  # a file whose stored key belongs to another device, at this key's path
            entry["key"]["device"] = "cpu:elsewhere:64c"
        p.write_text(json.dumps(entry))
    assert cache.get(k) is None
    assert not p.exists() and p.with_suffix(".corrupt").exists()
    cache.put(k, {"chunk": 32})  # and the slot is usable again
    assert cache.get(k) == {"chunk": 32}


def toy_kernel(calls, wrong_is_fastest=True):
    x = torch.linspace(-1, 1, 64)

    def run(config):
        calls.append(config["id"])
        if config["slow"]:
            torch.mm(torch.ones(300, 300), torch.ones(300, 300))
        return x * config["scale"]

    space = [{"id": 0, "scale": 1.0, "slow": True}, {"id": 1, "scale": 1.5, "slow": False},
             {"id": 2, "scale": 1.0, "slow": False}]
    if not wrong_is_fastest:
        space = [space[0]]
    return TunableKernel("toy[f32]", "triton", "toy source", space, run, lambda: x, seq_len=100, tolerance=1e-6)


def test_fast_wrong_config_is_never_chosen(cache):
    calls = []
    res = tune_kernel(toy_kernel(calls), cache=cache, progress=False)
    assert res.config["id"] == 2 and not res.from_cache
    assert [c["id"] for c, _ in res.rejected] == [1]
    again = tune_kernel(toy_kernel(calls := []), cache=cache, progress=False)
    assert again.from_cache and again.config["id"] == 2 and calls == []


def test_no_valid_config_is_an_error(cache):
    k = toy_kernel([])
    k.space = [k.space[1]]
    with pytest.raises(TuningError, match="none of the 1 configs tried matched the reference"):
        tune_kernel(k, cache=cache, progress=False)


def test_budget_in_trials(cache):
    res = tune_kernel(toy_kernel([]), cache=cache, progress=False, max_trials=1)
    assert res.tried == 1 and res.config["id"] == 0


SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_tune_cache import toy_kernel
    from sessa_compiler.autotune import tune_kernel
    calls = []
    k = toy_kernel(calls)
    slow_run = k.run
    def run(config):
        # Every call sleeps, so two tuners overlap; the slow config sleeps far longer than the
        # scheduler's jitter on a loaded 2-core machine, so timing cannot pick it by accident.
        time.sleep(0.5 if config["slow"] else 0.1)
        return slow_run(config)
    k.run = run
    res = tune_kernel(k, progress=False, repeats=1)
    print(json.dumps({{"config": res.config["id"], "from_cache": res.from_cache, "calls": len(calls)}}))
""")


def run_tuner(cache_dir, *, wait=True):
    env = {**os.environ, "SESSA_COMPILER_CACHE_DIR": str(cache_dir)}
    tests = os.path.dirname(__file__)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(tests=tests)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc


def result(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_cache_hit_in_a_new_process_runs_no_tuning(tmp_path):
    first = result(run_tuner(tmp_path))
    assert first == {"config": 2, "from_cache": False, "calls": first["calls"]} and first["calls"] > 0
    second = result(run_tuner(tmp_path))
    assert second == {"config": 2, "from_cache": True, "calls": 0}


def test_two_concurrent_tuners_agree_and_tune_once(tmp_path):
    a, b = run_tuner(tmp_path), run_tuner(tmp_path)
    ra, rb = result(a), result(b)
    assert ra["config"] == rb["config"] == 2
    assert sorted([ra["from_cache"], rb["from_cache"]]) == [False, True]
    entries = list(tmp_path.rglob("*.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["config"]["id"] == 2
