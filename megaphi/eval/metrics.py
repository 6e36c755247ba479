"""pass@k with the unbiased estimator (Chen et al. 2021), the results summary and its table."""

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that k of n samples (c of them correct), drawn without replacement, hold a correct one.

    1 - C(n-c, k) / C(n, k), with the ratio as a product of k factors (n-c-i)/(n-i) so it never overflows.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= correct <= samples, got correct={c}, samples={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= samples per problem ({n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def summarize(benchmark: str, per_problem: list[dict], ks=(1, 10, 100), **extra) -> dict:
    """{"benchmark", "n_problems", "n_samples", "pass@k" for each k <= the fewest samples of a problem, ...}.

    per_problem: dicts with "n" (samples) and "correct"; extra keys are copied in (mode, source, ...).
    """
    if not per_problem:
        raise ValueError("no problems to summarize")
    fewest = min(p["n"] for p in per_problem)
    summary = {"benchmark": benchmark, "n_problems": len(per_problem), "n_samples": fewest}
    for k in sorted(set(ks)):
        if k <= fewest:
            summary[f"pass@{k}"] = sum(pass_at_k(p["n"], p["correct"], k) for p in per_problem) / len(per_problem)
    statuses = {}
    for p in per_problem:
        for result in p.get("results", []):
            status = "passed" if result == "passed" else "timed out" if result.startswith("timed out") else "failed"
            statuses[status] = statuses.get(status, 0) + 1
    summary["results"] = statuses
    summary.update(extra)
    return summary


def format_table(summary: dict) -> str:
    """The summary as a small text table."""
    keys = [k for k in summary if k.startswith("pass@")]
    header = ["benchmark", "problems", "samples/problem", *keys, "passed", "failed", "timed out"]
    counts = summary.get("results", {})
    row = [summary["benchmark"] + (f" ({summary['mode']})" if summary.get("mode") else ""),
           str(summary["n_problems"]), str(summary["n_samples"]), *(f"{100 * summary[k]:.2f}%" for k in keys),
           *(str(counts.get(s, 0)) for s in ("passed", "failed", "timed out"))]
    widths = [max(len(h), len(v)) for h, v in zip(header, row)]

    def line(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), line(row)])
