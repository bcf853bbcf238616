"""model_type -> family module (its `build(config)`, on-disk per-expert names and the config
fields that fix its shapes)."""
from collections.abc import Mapping

from transformers import CONFIG_MAPPING

from moegen.errors import ConfigError, UnsupportedModelError
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
COMMON_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def family(model_type: str, where: str = "config.json"):
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}") from None


def _spellings(model_type: str, field: str) -> set[str]:
    """field and the names its transformers config class maps onto it (attribute_map), since
    transformers 5 saves some fields under another family's name (Qwen3's num_experts as
    num_local_experts)."""
    aliases = CONFIG_MAPPING[model_type].attribute_map
    return {field, aliases.get(field, field)} | {alias for alias, real in aliases.items() if real == field}


def checked_family(raw: Mapping, where: str):
    """The family of a config.json dict, once it names every field that fixes the model's shapes:
    transformers would fill a missing one with its own default (Mixtral's: 8 experts of width
    14336) and so build, and plan, some other model."""
    model_type = raw.get("model_type")
    fam = family(model_type, where)
    for name in COMMON_SHAPE_FIELDS + fam.SHAPE_FIELDS:
        if all(raw.get(spelling) is None for spelling in _spellings(model_type, name)):
            raise ConfigError(f"{where}: field {name!r} is missing (model_type {model_type!r})")
    return fam
