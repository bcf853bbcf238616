"""What a run measured: the accounting record every system under test produces (RunRecord), from
which moegen.bench.metrics derives its figures, and the engine's running account that it
freezes into one (EngineStats.record)."""
from dataclasses import dataclass, field

PHASES = ("prefill", "decode", "total")
# EngineStats' figures by name (EngineStats.as_dict)
FIGURES = ("prefill_tokens", "decode_tokens", "prefill_tok_s", "decode_tok_s", "prefill_steps", "decode_steps",
           "prompt_tokens_computed", "prefix_hit_rate", "experts_run", "experts_skipped", "attention")


def tokens_per_s(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


@dataclass
class EngineStats:
    """The engine's running account since it was built or reset_stats(): the fields of a
    RunRecord, appended to as passes run and calls finish, and the counters only the engine has.
    Every derived figure comes from record(), so it is computed in one place (RunRecord)."""
    attention: str = ""
    prompt_lens: list = field(default_factory=list)           # per sequence served (generated or scored)
    gen_lens: list = field(default_factory=list)              # its new tokens; 0 for a scored request
    prompt_cached_lens: list = field(default_factory=list)    # its prompt tokens reused from the KV cache
    prefill_pass_tokens: list = field(default_factory=list)   # tokens per prefill pass
    decode_step_seqs: list = field(default_factory=list)      # sequences per decode step
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_distinct_experts: int = 0  # experts_run during prefill passes (for S-MBU)
    decode_distinct_experts: int = 0
    experts_run: int = 0             # (layer, expert) pairs that ran, summed over steps
    experts_skipped: int = 0         # (layer, expert) pairs with no token, never run nor copied
    plan: object = None              # the last call's settings, plan and prediction (planner.policy.CallPlan)

    def add_pass(self, phase: str, size: int, seconds: float, experts: int) -> None:
        """One forward pass: `size` tokens (prefill) or sequences (decode) in `seconds`, in which
        `experts` (layer, expert) pairs ran."""
        if check_phase(phase) == "prefill":
            self.prefill_pass_tokens.append(size)
            self.prefill_s += seconds
            self.prefill_distinct_experts += experts
        else:
            self.decode_step_seqs.append(size)
            self.decode_s += seconds
            self.decode_distinct_experts += experts

    def add_sequences(self, prompt_lens, gen_lens, cached_lens=None) -> None:
        """The sequences a call served, once it is done (their passes are already added);
        cached_lens: each one's prompt tokens taken from the KV cache (default none)."""
        self.prompt_lens.extend(prompt_lens)
        self.gen_lens.extend(gen_lens)
        self.prompt_cached_lens.extend(cached_lens if cached_lens is not None else [0] * len(prompt_lens))

    def record(self, wall_s: float | None = None) -> "RunRecord":
        return RunRecord(self.prompt_lens, self.gen_lens, self.prefill_s, self.decode_s, wall_s,
                         self.prefill_pass_tokens, self.decode_step_seqs, self.prefill_distinct_experts,
                         self.decode_distinct_experts, self.prompt_cached_lens)

    # what the CLI, the eval summary and the systems read: as_dict, the one way they become a dict
    def as_dict(self, names: "tuple[str, ...]" = ()) -> dict:
        """The named figures (default: all of FIGURES) as one dict, tokens/s rounded to 0.1, as
        summaries print and record them."""
        return {n: round(getattr(self, n), 1) if n.endswith("_tok_s") else getattr(self, n) for n in names or FIGURES}

    @property
    def prefill_tokens(self) -> int:
        return self.record().prompt_tokens

    @property
    def decode_tokens(self) -> int:
        return self.record().decode_tokens

    @property
    def prompt_tokens_computed(self) -> int:
        """Prompt tokens prefill really computed (the others' K/V came from the cache)."""
        return self.record().prompt_tokens_computed

    @property
    def prefix_hit_rate(self) -> float:
        """Share of the prompt tokens asked for whose K/V was reused (0 without sharing)."""
        return self.record().prefix_hit_rate

    @property
    def prefill_steps(self) -> int:
        return len(self.record().prefill_passes())

    @property
    def decode_steps(self) -> int:
        return len(self.record().decode_steps())

    @property
    def prefill_tok_s(self) -> float:
        rec = self.record()
        return tokens_per_s(rec.prompt_tokens, rec.prefill_s)

    @property
    def decode_tok_s(self) -> float:
        rec = self.record()
        return tokens_per_s(rec.decode_tokens, rec.decode_s)


def lockstep_steps(gen_lens) -> list[int]:
    """Useful sequences per decode step of a lockstep batch: step j serves the sequences that
    still need a token (each sequence's first new token comes from prefill)."""
    return [sum(g - 1 > j for g in gen_lens) for j in range(max((g - 1 for g in gen_lens), default=0))]



@dataclass(frozen=True)
class RunRecord:
    """One run's accounting. Sequence i has prompt_lens[i] prompt tokens and gen_lens[i] new
    tokens, the first sampled from the prefill's logits and each further one costing a decode
    step (0 for a request that was only scored). A forward pass is either a prefill pass or a
    decode step.

    prefill_pass_tokens: prompt tokens computed in each prefill pass; () = all prompts in one pass.
    decode_step_seqs: sequences in each decode step; () = lockstep (step j runs the sequences
        that still need a token).
    *_distinct_experts: sum over that phase's passes and over MoE layers of the number of experts
        that received >= 1 token; None = estimate with uniform routing.
    wall_s: the whole run; None = prefill_s + decode_s (phases that do not overlap).
    prompt_cached_lens: per sequence, its leading prompt tokens whose K/V was reused (a shared
        prefix, or a forked sample's whole prompt) rather than computed; () = none.
    """
    prompt_lens: tuple[int, ...]
    gen_lens: tuple[int, ...]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    wall_s: float | None = None
    prefill_pass_tokens: tuple[int, ...] = ()
    decode_step_seqs: tuple[int, ...] = ()
    prefill_distinct_experts: int | None = None
    decode_distinct_experts: int | None = None
    prompt_cached_lens: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("prompt_lens", "gen_lens", "prefill_pass_tokens", "decode_step_seqs", "prompt_cached_lens"):
            object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))
        if len(self.prompt_lens) != len(self.gen_lens):
            raise ValueError(f"RunRecord: {len(self.prompt_lens)} prompt_lens but {len(self.gen_lens)} gen_lens")
        if min(self.prompt_lens + self.gen_lens, default=0) < 0:
            raise ValueError("RunRecord: negative prompt or generation length")
        if self.prompt_cached_lens and (len(self.prompt_cached_lens) != len(self.prompt_lens) or any(
                not 0 <= c <= n for c, n in zip(self.prompt_cached_lens, self.prompt_lens))):
            raise ValueError("RunRecord: prompt_cached_lens must give each sequence 0 .. its prompt length")
        self._check_sum("prefill_pass_tokens", self.prompt_tokens_computed)
        self._check_sum("decode_step_seqs", self.decode_tokens)

    def _check_sum(self, name: str, expected: int) -> None:
        got = getattr(self, name)
        if got and sum(got) != expected:
            raise ValueError(f"RunRecord: {name} sums to {sum(got)}, expected {expected}")

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lens)

    @property
    def prompt_tokens_computed(self) -> int:
        return self.prompt_tokens - sum(self.prompt_cached_lens)

    @property
    def prefix_hit_rate(self) -> float:
        return sum(self.prompt_cached_lens) / self.prompt_tokens if self.prompt_tokens else 0.0

    def cached_lens(self) -> tuple[int, ...]:
        """Per sequence, its prompt tokens reused from the cache (zeros without sharing)."""
        return self.prompt_cached_lens or (0,) * len(self.prompt_lens)

    @property
    def generated_tokens(self) -> int:
        return sum(self.gen_lens)

    @property
    def decode_tokens(self) -> int:
        """Tokens fed through decode steps (each sequence's first new token comes from prefill)."""
        return sum(max(g - 1, 0) for g in self.gen_lens)

    @property
    def total_s(self) -> float:
        return self.wall_s if self.wall_s is not None else self.prefill_s + self.decode_s

    def prefill_passes(self) -> tuple[int, ...]:
        """Computed tokens per prefill pass."""
        if self.prefill_pass_tokens:
            return self.prefill_pass_tokens
        return (self.prompt_tokens_computed,) if self.prompt_tokens_computed else ()

    def decode_steps(self) -> tuple[int, ...]:
        """Sequences (= tokens) per decode step."""
        if self.decode_step_seqs:
            return self.decode_step_seqs
        return tuple(lockstep_steps(self.gen_lens))

    def latency_s(self, phase: str) -> float:
        return {"prefill": self.prefill_s, "decode": self.decode_s, "total": self.total_s}[check_phase(phase)]



def check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {', '.join(PHASES)}")
    return phase

