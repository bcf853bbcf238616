"""The one table of reported metrics: name, label, unit, format and which way is better. Every
table (`moegen bench`, `moegen results`, the flows' reports), plot, ratio against a baseline and the
nightly regression check reads it, so a figure is named, shown and compared the same way
everywhere. No heavy imports: the flows load it at start."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str                     # the key in a run's metrics
    label: str                    # column and plot title
    unit: str                     # "" for fractions and counts
    spec: str                     # format() spec of a value in a fixed table
    higher_is_better: bool = True
    ratio: bool = True            # compared against a baseline (`ratios` of a bench cell)
    regression: bool = False      # watched by the nightly regression check by default
    short: str = ""               # label in a narrow terminal table (default: label)


METRICS = {m.name: m for m in (
    Metric("e2e_tokens_per_s", "e2e tok/s", "tokens/s", ",.1f", regression=True),
    Metric("prefill_tokens_per_s", "prefill tok/s", "tokens/s", ",.1f", regression=True),
    Metric("decode_tokens_per_s", "decode tok/s", "tokens/s", ",.1f", regression=True),
    Metric("decode_s_mfu", "S-MFU (decode)", "", ".1%", short="S-MFU"),
    Metric("decode_s_mbu", "S-MBU (decode)", "", ".1%", short="S-MBU"),
    Metric("prefill_s_mfu", "S-MFU (prefill)", "", ".1%", ratio=False),
    Metric("usd_per_million_tokens", "$/M tokens", "USD", ".3f", higher_is_better=False, short="$/Mtok"),
    Metric("wall_s", "wall s", "s", ".2f", higher_is_better=False, ratio=False),
    Metric("peak_rss_bytes", "peak RSS", "bytes", ".2f", higher_is_better=False, ratio=False),
    Metric("accuracy", "accuracy", "", ".1%", regression=True),
)}

# in the table's order: the ratios of a bench cell (moegen.bench.run's JSON) and the flows' tables,
# and the figures the nightly regression check watches unless told others
RATIO_METRICS = tuple(m.name for m in METRICS.values() if m.ratio)
REGRESSION_METRICS = tuple(m.name for m in METRICS.values() if m.regression)
LOWER_IS_BETTER = frozenset(m.name for m in METRICS.values() if not m.higher_is_better)
# the headline columns of results tables, in this order, when a cell has them
TABLE_METRICS = ("accuracy", "e2e_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_s_mfu",
                 "decode_s_mbu", "usd_per_million_tokens")


def label(name: str, short: bool = False) -> str:
    """A metric's label (short: for a narrow terminal table); an unknown name (a per-task
    accuracy, say) is its own."""
    metric = METRICS.get(name)
    return name if metric is None else (short and metric.short) or metric.label


def formatted(name: str, value) -> str:
    """A value in its metric's fixed format ("-" when unknown); bytes shown in GiB."""
    if value is None:
        return "-"
    if name == "peak_rss_bytes":
        return f"{value / 2 ** 30:.2f} GiB"
    return f"{value:{METRICS[name].spec}}"
