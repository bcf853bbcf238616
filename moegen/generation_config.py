"""A checkpoint's generation_config.json, read in this one place: GenerationDefaults
(moegen.engine.params) takes its EOS ids and sampling settings from it, the tokenizers
(moegen.tokenizer) their BOS and EOS ids."""
import json
from pathlib import Path

from moegen.errors import InputError

GENERATION_CONFIG = "generation_config.json"


def read_generation_config(model_dir) -> object:
    """The file's JSON value (a dict in any sound checkpoint), None when the checkpoint has none;
    InputError naming the file when it cannot be read as JSON."""
    path = Path(model_dir) / GENERATION_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable JSON: {e}") from None
