"""What a caller asks for (SamplingParams), what a checkpoint suggests when the caller leaves a
setting unset (GenerationDefaults), and what the caller gets back (Completion)."""
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from moegen.errors import InputError

log = logging.getLogger("moegen")
GENERATION_CONFIG = "generation_config.json"
_SAMPLING_KEYS = ("temperature", "top_p", "top_k")
# generation_config settings moegen cannot honour: said once at load, never silently
_UNSUPPORTED_KEYS = ("repetition_penalty", "min_p", "typical_p", "no_repeat_ngram_size", "num_beams")


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = all tokens
    seed: int | None = None           # per-request generators: same seed, same tokens, whatever the batch
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or math.isinf(self.temperature):     # NaN compares false
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise InputError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationDefaults:
    """A checkpoint's generation_config.json, as transformers and vLLM read it: the ids that end
    generation, and the sampling settings (temperature, top_p, top_k) for a caller that sets none.

    The sampling settings count only when the file says do_sample: true (transformers' rule;
    without it transformers decodes greedily whatever temperature the file names). Python's
    SamplingParams() stays greedy; the CLI and OpenAI batch files, which know what a user left
    unset, build their SamplingParams through `params()`."""
    eos_token_ids: tuple = ()
    sampling: dict = field(default_factory=dict)

    @classmethod
    def read(cls, model_dir) -> "GenerationDefaults":
        path = Path(model_dir) / GENERATION_CONFIG
        if not path.is_file():
            return cls()
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: unreadable JSON: {e}") from None
        if not isinstance(config, dict):
            raise InputError(f"{path}: must hold a JSON object")
        eos = config.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        sampling = {k: config[k] for k in _SAMPLING_KEYS if config.get(k) is not None} if config.get("do_sample") else {}
        ignored = {k: config[k] for k in _UNSUPPORTED_KEYS if config.get(k) not in (None, 0, 1, 1.0)}
        if ignored:
            log.warning("%s: moegen does not support %s; ignored", path, ignored)
        try:
            SamplingParams(**sampling)
        except (InputError, TypeError) as e:
            raise InputError(f"{path}: {e}") from None
        return cls(tuple(int(i) for i in eos), sampling)

    def params(self, **given) -> SamplingParams:
        """SamplingParams from a caller's settings, None meaning unset: an unset temperature,
        top_p or top_k takes this checkpoint's value, else SamplingParams' own default."""
        chosen = {k: v for k, v in given.items() if v is not None}
        return SamplingParams(**{**self.sampling, **chosen})


@dataclass
class Completion:
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str                # "stop" (EOS, stop id or stop string) or "length"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def to_row(self) -> dict:
        """The JSONL output row (`moegen generate`, the generate flow's journal)."""
        return {"index": self.index, "prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids,
                "text": self.text, "finish_reason": self.finish_reason}
