"""model_type -> family module (its `build(config)` and on-disk per-expert names)."""
from moegen.errors import UnsupportedModelError
from moegen.models import deepseek, mixtral, olmoe, qwen_moe

FAMILIES = {
    "mixtral": mixtral,
    "qwen2_moe": qwen_moe,
    "qwen3_moe": qwen_moe,
    "olmoe": olmoe,
    "deepseek_v2": deepseek,
    "deepseek_v3": deepseek,
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family(model_type: str, where: str = "config.json"):
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}") from None
