"""pass@k against brute force over every k-subset of the samples; the summary and its table."""

import itertools
import math

import pytest

from megaphi.eval.metrics import format_table, pass_at_k, summarize


def brute_force_pass_at_k(n, c, k):
    """The fraction of k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_for_large_n_matches_the_binomial_formula():
    for n, c, k in [(200, 3, 100), (200, 0, 10), (200, 200, 1), (1000, 17, 10), (164, 1, 1)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-15)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_summary_averages_over_problems_and_skips_k_above_the_samples():
    per_problem = [{"n": 10, "correct": 10, "results": ["passed"] * 10},
                   {"n": 10, "correct": 0, "results": ["failed: x"] * 9 + ["timed out"]},
                   {"n": 10, "correct": 5, "results": ["passed"] * 5 + ["failed: y"] * 5}]
    summary = summarize("humaneval", per_problem, ks=(1, 10, 100), mode="test")
    assert summary["benchmark"] == "humaneval" and summary["n_problems"] == 3 and summary["n_samples"] == 10
    assert summary["pass@1"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert summary["pass@10"] == pytest.approx((1 + 0 + 1) / 3)
    assert "pass@100" not in summary
    assert summary["results"] == {"passed": 15, "failed": 14, "timed out": 1}
    table = format_table(summary)
    assert "pass@1" in table and "pass@10" in table and "humaneval (test)" in table
    assert f"{100 * summary['pass@1']:.2f}%" in table
