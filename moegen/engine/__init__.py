from moegen.engine.config import EngineConfig
from moegen.engine.llm_engine import Engine
from moegen.engine.stats import EngineStats
from moegen.engine.params import Completion, SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "EngineStats", "SamplingParams"]
