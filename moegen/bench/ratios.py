"""Figures against a baseline's: the one ratio rule, over the compared metrics of the metrics table
(moegen.results.metrics), for the bench JSON (moegen.bench.run) and the flows' tables
(tasks.metrics). No heavy imports: the flows load it at start."""
from moegen.results.metrics import LOWER_IS_BETTER, RATIO_METRICS


# > 1 always means better: lower-is-better figures are inverted


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
