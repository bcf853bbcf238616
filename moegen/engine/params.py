"""What a caller asks for (SamplingParams), what a checkpoint suggests when the caller leaves a
setting unset (GenerationDefaults), and what the caller gets back (Completion)."""
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from moegen.errors import InputError
from moegen.generation_config import GENERATION_CONFIG, read_generation_config

log = logging.getLogger("moegen")
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
    # samples per prompt, forked from one prefill of it; sample j of request i draws from
    # seed + i * n + j, so each equals the request alone (n = 1) with that seed
    n: int = 1
    # log-probabilities returned (Completion.logprobs / .prompt_logprobs): None = none; k = the
    # chosen token's plus the k most likely alternatives at each position (0: the chosen one only)
    logprobs: int | None = None         # per generated token
    prompt_logprobs: int | None = None  # per prompt token, given the ones before it

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
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise InputError(f"n (samples per prompt) must be an integer >= 1, got {self.n!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
                raise InputError(f"{name} must be None or an integer >= 0 (the alternatives listed besides "
                                 f"the chosen token), got {k!r}")

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
        config = read_generation_config(model_dir)
        if config is None:
            return cls()
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
class SequenceLogprobs:
    """What a running sequence collects for its Completion's logprobs (moegen.engine.sampler
    fills it, only when its SamplingParams ask)."""
    prompt: list | None = None        # prompt_logprobs, set by the prefill
    output: list = field(default_factory=list)    # one entry per generated token


@dataclass
class Completion:
    """One finished sequence. With SamplingParams(logprobs=k), `logprobs` holds one dict per
    generated token, {token id: log-probability}: the chosen token's first, then the k most
    likely in descending order (a chosen token among them is not repeated: k or k + 1 entries).
    With prompt_logprobs=k, `prompt_logprobs` holds one per prompt token: None for the first,
    then the same kind of dict for each token given the ones before it (vLLM's shapes).

    The values are float32 log_softmax of the model's raw logits: before temperature, top-k and
    top-p, so a sampled token's log-probability is under the model's own distribution, not the
    filtered one it was drawn from (vLLM's default, logprobs_mode="raw_logprobs")."""
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str                # "stop" (EOS, stop id or stop string) or "length"
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # SamplingParams(n > 1): the fields above are sample 0's and `samples` lists all n in order
    # (each a Completion with its `sample` number; samples[0] repeats the fields above); n = 1: []
    sample: int = 0
    samples: list["Completion"] = field(default_factory=list)

    @classmethod
    def of_samples(cls, samples: list["Completion"]) -> "Completion":
        """A request's Completion from its n samples' (in sample order)."""
        return replace(samples[0], samples=list(samples))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def to_row(self) -> dict:
        """The JSONL output row (`moegen generate`, the generate flow's journal)."""
        row = {"index": self.index, "prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids,
               "text": self.text, "finish_reason": self.finish_reason}
        # only when asked, so rows of runs without logprobs stay as they were; JSON keys are
        # strings: {"415": -1.25, ...}, the chosen token's first
        if self.logprobs is not None:
            row["logprobs"] = [_json_keys(d) for d in self.logprobs]
        if self.prompt_logprobs is not None:
            row["prompt_logprobs"] = [None if d is None else _json_keys(d) for d in self.prompt_logprobs]
        if self.samples:          # n > 1: every sample's own fields (the prompt's are the row's)
            row["samples"] = [{"sample": s.sample, **{k: v for k, v in s.to_row().items()
                                                      if k not in ("index", "prompt_token_ids", "prompt_logprobs")}}
                              for s in self.samples]
        return row


def _json_keys(logprobs: dict[int, float]) -> dict[str, float]:
    return {str(t): lp for t, lp in logprobs.items()}


def encode_prompt(prompt, index, max_new_tokens: int, truncate: str | None, tokenizer, vocab_size: int,
                  max_model_len: int) -> list[int]:
    """A prompt (text or token ids) as the token ids a model of `vocab_size` and `max_model_len`
    takes with room for max_new_tokens (truncate="left": its last tokens); InputError naming
    prompt `index` otherwise. Engine.encode, and a batch file's lines read without an engine."""
    if isinstance(prompt, str):
        if not prompt:
            raise InputError(f"prompt {index} is empty")
        if tokenizer is None:
            raise InputError(f"prompt {index} is text but the engine has no tokenizer")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise InputError(f"prompt {index} must be a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise InputError(f"prompt {index} is empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InputError(f"prompt {index} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    room = max_model_len - max_new_tokens
    if len(ids) > room:
        if truncate != "left" or room < 1:
            raise InputError(f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} the "
                             f"model's context of {max_model_len} leaves room for {max(room, 0)} "
                             f"(truncate='left' keeps the last tokens)")
        ids = ids[-room:]
    return ids
