"""Shape-only config.json files of real MoE checkpoints, for planning without the weights.

Each file holds the fields of the model's public Hugging Face config.json (no weights, no
tokenizer); `_name_or_path` names the repository it describes. Look-ups are case-insensitive and
accept the short name ("mixtral-8x7b") or the repository id ("mistralai/Mixtral-8x7B-v0.1").
"""
import json
from pathlib import Path

from moegen.errors import ConfigError

CONFIG_DIR = Path(__file__).parent


def list_configs() -> list[str]:
    """Short names of the bundled configs, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _find(name: str) -> Path | None:
    key = name.strip().lower()
    for stem in list_configs():
        path = CONFIG_DIR / f"{stem}.json"
        repo = str(_read(path).get("_name_or_path", "")).lower()
        if key in (stem, repo, repo.rsplit("/", 1)[-1]):
            return path
    return None


def load_config(name: str) -> dict:
    """The config dict of a bundled model; ConfigError naming the choices if there is none."""
    path = _find(name)
    if path is None:
        raise ConfigError(f"no bundled config named {name!r} (and no such file or directory); "
                          f"bundled: {', '.join(list_configs())}")
    return _read(path)
