"""moegen: high-throughput offline inference for mixture-of-experts LLMs (module-based batching).

`from moegen import Engine, SamplingParams`. Names load lazily so that light imports
(moegen.errors, moegen.checkpoints.fixture) do not pull in the engine.
"""
__version__ = "0.1.0"
_EXPORTS = {"Engine": "moegen.engine", "EngineConfig": "moegen.engine", "SamplingParams": "moegen.engine",
            "Completion": "moegen.engine", "load_model": "moegen.loader"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moegen' has no attribute {name!r}")
