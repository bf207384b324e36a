"""Benchmark timing: variants in turns, medians with spreads, no ratio when the spread is large."""
from sessa_compiler.timing import Timing, ratio, time_alternating


def test_variants_are_timed_in_turns_starting_at_a_different_one_each_round():
    calls = []
    fns = {n: (lambda x, n=n: calls.append(n)) for n in "abc"}
    out = time_alternating(fns, None, repeats=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {n: len(t.times_ms) for n, t in out.items()} == {"a": 3, "b": 3, "c": 3}


def test_a_ratio_only_when_both_spreads_are_small():
    steady = Timing("eager", [10.0, 10.1, 9.9, 10.0, 10.05])
    fast = Timing("tvm", [5.0, 5.05, 4.95, 5.0, 5.02])
    noisy = Timing("tvm", [5.0, 9.0, 2.0, 5.0, 30.0])
    assert abs(ratio(steady, fast) - 2.0) < 0.05
    assert noisy.spread > 0.5 and ratio(steady, noisy) is None and ratio(noisy, fast) is None
    assert "quartiles" in str(fast) and "5 runs" in str(fast)
