from moegen.engine.llm_engine import Engine, EngineConfig, EngineStats
from moegen.engine.params import Completion, SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "EngineStats", "SamplingParams"]
