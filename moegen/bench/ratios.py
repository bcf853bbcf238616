"""Figures against a baseline's: the one list of compared metrics and the one ratio rule, for the
bench JSON (moegen.bench.run) and the flows' tables (tasks.metrics). No heavy imports: the
flows load it at start."""

# > 1 always means better: lower-is-better figures are inverted
RATIO_METRICS = ("e2e_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_s_mfu", "decode_s_mbu",
                 "usd_per_million_tokens", "accuracy")
LOWER_IS_BETTER = frozenset({"usd_per_million_tokens"})


def ratio(value: float | None, base: float | None, name: str) -> float | None:
    """value / base, inverted for lower-is-better metrics; None where either is unknown or the
    division is undefined."""
    if value is None or base in (None, 0):
        return None
    if name in LOWER_IS_BETTER:
        return base / value if value else None
    return value / base


def metric_ratios(metrics: dict, base: dict, names: tuple[str, ...] = RATIO_METRICS) -> dict:
    """Each of `names` in `metrics` against `base` (None where unknown)."""
    return {name: ratio(metrics.get(name), base.get(name), name) for name in names}
