"""What a caller asks for (SamplingParams) and what it gets back (Completion)."""
import math
from dataclasses import dataclass, field

from moegen.errors import InputError


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
        """The JSONL output row (`moegen generate`, the generate flow's shards)."""
        return {"index": self.index, "prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids,
                "text": self.text, "finish_reason": self.finish_reason}
