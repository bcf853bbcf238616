"""System `moegen-int8`: the moegen engine with its routed experts multiplied in int8.

`experts_kernel=int8` is lossy (weights per output column and activations per token rounded to
int8), so it is never moegen's default; as a system of its own it runs beside the exact `moegen`
and the peers in one bench run, its speed and its agreement with the reference system reported
side by side. Everything else is the same code as `moegen`.
"""
from __future__ import annotations

from moegen.bench.systems.moegen_engine import MoegenSystem
from moegen.engine.options import engine_option_names


class Int8ExpertsSystem(MoegenSystem):
    name = "moegen-int8"
    description = "moegen engine with experts_kernel=int8 (lossy: routed experts multiplied in int8)"
    options = dict.fromkeys(o for o in engine_option_names() if o != "experts_kernel")

    def engine_overrides(self, options: dict) -> dict:
        return {**super().engine_overrides(options), "experts_kernel": "int8"}
