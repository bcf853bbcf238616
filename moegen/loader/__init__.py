"""Read a Hugging Face checkpoint directory into a moegen model.

config.json is parsed by the transformers config class of its model_type; tensors are
memory-mapped from *.safetensors (with or without model.safetensors.index.json) and cast to the
requested dtype. Expert weights are accepted in both on-disk layouts: per expert
(`experts.{e}.{gate,up,down}` under the family's names) or fused transformers-5 tensors
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]).

Quantized checkpoints (config.json's `quantization_config`) load as they are stored (layouts in
moegen.layers.quantized): FP8 blocks (`quant_method: fp8`, DeepSeek-V3's `X.weight` in
float8_e4m3fn + `X.weight_scale_inv`) and GPTQ int8/int4 (`quant_method: gptq`, `X.qweight`,
`X.qzeros`, `X.scales`, `X.g_idx`). Weights the engine uses only as GEMM operands stay quantized
(dequantized chunk by chunk at each GEMM); the few it uses otherwise (MLA's kv_b_proj, which
absorbed decode views per head; a tied embedding) are dequantized once here. Tensors a
quantized checkpoint stores unquantized (modules its config excludes: norms, routers, lm_head)
load as usual.
"""
# The loader's public surface (what the engine, planner, checkpoints and benchmarks use), by concern:
# config.py (config.json and bundled configs), files.py (safetensors files and their reader),
# quant.py (quantization schemes and the configs moegen writes), mapped.py (pages handed back),
# checkpoint.py (a checkpoint opened into a model), dummy.py (random weights of a config's shapes).
from moegen.loader.checkpoint import FP32_TENSORS, Checkpoint, load_model, tensor_sources
from moegen.loader.config import config_from, read_config, read_json_config
from moegen.loader.dummy import dummy_model, random_gptq
from moegen.loader.files import TensorReader, weight_files
from moegen.loader.mapped import MappedPages
from moegen.loader.quant import QuantScheme, fp8_quant_config, gptq_config, quant_scheme, read_weight

__all__ = ["FP32_TENSORS", "Checkpoint", "load_model", "tensor_sources", "config_from", "read_config",
           "read_json_config", "dummy_model", "random_gptq", "TensorReader", "weight_files", "MappedPages",
           "QuantScheme", "fp8_quant_config", "gptq_config", "quant_scheme", "read_weight"]
