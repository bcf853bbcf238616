"""A checkpoint's config: config.json read and checked, or a config from a dict, a JSON file or a
bundled name (moegen/configs), as the transformers config class of its model_type."""
import json
from pathlib import Path

from transformers import AutoConfig

from moegen.errors import CheckpointError, ConfigError
from moegen.models.registry import checked_family, family


def read_json_config(cfg_file: Path) -> dict:
    """A config.json's fields, its model_type and shape fields checked."""
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file} must hold a JSON object, not a {type(raw).__name__}")
    if "model_type" not in raw:
        raise ConfigError(f"{cfg_file} has no model_type field")
    check_model_type(raw, str(cfg_file))
    checked_family(raw, where=str(cfg_file))
    return raw


def read_config(path: str | Path):
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist or is not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing: a checkpoint directory needs config.json")
    read_json_config(cfg_file)
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises several types for bad fields
        raise ConfigError(f"{cfg_file}: transformers could not parse it: {e}") from e


def check_model_type(raw: dict, where: str) -> None:
    """model_type must be a string (a list or number would fail as a dictionary key, deep inside)."""
    if not isinstance(raw["model_type"], str):
        raise ConfigError(f"{where}: model_type must be a string such as \"mixtral\", got {json.dumps(raw['model_type'])}")


def config_from(source):
    """A transformers config from a config object, a config.json dict, a checkpoint directory or
    a config JSON file (any name), or the name of a bundled real-model config (moegen/configs)."""
    if hasattr(source, "model_type") and not isinstance(source, dict):
        family(source.model_type)
        return source
    where = "config"
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return read_config(source)
    if isinstance(source, (str, Path)) and Path(source).is_file():
        source, where = read_json_config(Path(source)), str(source)
    elif isinstance(source, str):
        from moegen.configs import load_config
        source, where = load_config(source), f"bundled config {source!r}"
    if not isinstance(source, dict) or "model_type" not in source:
        raise ConfigError(f"cannot read a model config from {source!r}")
    check_model_type(source, where)
    checked_family(source, where)
    fields = {k: v for k, v in source.items() if k not in ("model_type", "architectures", "_name_or_path")}
    try:
        return AutoConfig.for_model(source["model_type"], name_or_path=source.get("_name_or_path", ""), **fields)
    except Exception as e:
        raise ConfigError(f"transformers could not build a {source['model_type']} config: {e}") from e
