"""The generation pipeline, written once: prompts -> fingerprint -> journal (only the rows it lacks)
-> an engine or its Ray replicas -> rows as they finish -> the output in order -> one summary.
`moegen generate`, the Prefect `generate` flow and OpenAI batch files all run a GenerationJob and
report a GenerationSummary, so the three name the same figures the same way."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from moegen.bench.metrics import e2e_tokens_per_s
from moegen.dtypes import dtype_name
from moegen.engine.params import SamplingParams
from moegen.generation.fingerprint import fingerprint, sampling_fingerprint
from moegen.generation.journal import FLUSH_ROWS, FLUSH_SECONDS, open_output
from moegen.generation.replicas import Replicas, open_source
from moegen.recipe import EngineRecipe


@dataclass
class GenerationSummary:
    """One run's figures. rows: in the output; resumed_rows: kept from an earlier run of the same
    inputs; generated_rows, prompt_tokens, generated_tokens: this run's; load_s: building the
    engine(s); generate_s: from the first prompt sent to the last row written. details: the
    engine's own figures (one engine here), the replica count, or a batch file's request counts."""
    rows: int
    resumed_rows: int
    generated_rows: int
    prompt_tokens: int
    generated_tokens: int
    load_s: float
    generate_s: float
    e2e_tokens_per_s: float
    out: str
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The figures as one flat dict (engine figures beside the others), as printed and recorded."""
        figures = asdict(self)
        return {**{k: v for k, v in figures.items() if k != "details"}, **figures["details"]}


@dataclass
class Tally:
    """What this run added: rows, their prompt and generated tokens, and the time it took."""
    rows: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    wall_s: float = 0.0

    def add(self, row: dict) -> None:
        self.rows += 1
        self.prompt_tokens += len(row["prompt_token_ids"])
        # n > 1: every sample's tokens (the row's own fields repeat sample 0's)
        self.generated_tokens += sum(len(s["token_ids"]) for s in row.get("samples") or [row])
        self.wall_s = time.perf_counter() - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0


def pending_indices(num_rows: int, journal) -> list[int]:
    return [i for i in range(num_rows) if i not in journal.done]


def write_completions(journal, completions, extra: list[dict] | None = None, on_row=None, to_row=None) -> Tally:
    """Journal each completion as its row (plus the fields of extra[index] the row lacks), or as
    to_row(completion) when given (an OpenAI batch response row), in the order they come;
    on_row(tally) after each. Rows finished before an error are kept."""
    tally = Tally()
    with journal:
        for completion in completions:
            row = completion.to_row()
            row.update({k: v for k, v in (extra[row["index"]] if extra else {}).items() if k not in row})
            if journal.append(row if to_row is None else to_row(completion)):
                tally.add(row)
                if on_row is not None:
                    on_row(tally)
    tally.wall_s = time.perf_counter() - tally.started
    return tally


class NoProgress:
    def __init__(self, total: int, resumed: int):
        pass

    def update(self, tally) -> None:
        pass

    def close(self, tally) -> None:
        pass


@dataclass
class GenerationJob:
    """prompts (texts or token ids) through `recipe`'s engine into `out`, resumably. params: one
    SamplingParams, or one per prompt. kept: per prompt, fields copied beside its row (and part of
    the fingerprint); replicas > 1 or a Ray address: that many engines on Ray.

    An OpenAI batch file's rows (moegen.generation.openai_batch) also give: answered, the rows
    answered without the engine (refused lines: row -> its journal row, its prompt None);
    engine_index, each other row's index in the engine call (seeded sampling draws from it);
    to_row, a completion's journal row; identity, what the fingerprint holds instead of the
    prompts and params ({"rows", "sampling", "engine": settings added to the engine's})."""
    recipe: EngineRecipe
    prompts: list
    params: SamplingParams | list
    out: str
    kept: list[dict] | None = None
    truncate: str | None = None
    order: str = "input"
    flush_rows: int = FLUSH_ROWS
    flush_seconds: float = FLUSH_SECONDS
    overwrite: bool = False
    wait: bool = False
    replicas: int = 1
    ray_address: str | None = None
    replica_threads: int | None = None
    answered: dict | None = None
    engine_index: list | None = None
    to_row: Callable | None = None
    identity: dict | None = None

    def fingerprint(self) -> dict:
        """What decides the rows (moegen.generation.fingerprint): a journal of others is refused."""
        kwargs = self.recipe.kwargs
        engine = {"dtype": kwargs.get("dtype"), "max_model_len": kwargs.get("max_model_len"),
                  "truncate": self.truncate, "dummy_weights": self.recipe.dummy_weights}
        if self.identity is not None:
            return fingerprint(str(self.recipe.model), self.identity["rows"], self.identity["sampling"],
                               {**engine, **self.identity["engine"]})
        rows = self.prompts
        if self.kept and any(self.kept):
            rows = [{"prompt": p, **k} for p, k in zip(self.prompts, self.kept)]
        return fingerprint(str(self.recipe.model), rows, sampling_fingerprint(asdict(self.params)), engine)

    def run(self, progress=NoProgress) -> GenerationSummary:
        """progress(total, resumed) -> an object with update(tally) after each row and close(tally)."""
        journal = open_output(self.out, self.fingerprint(), self.flush_rows, self.flush_seconds, self.overwrite,
                              self.wait)
        try:
            return self._into(journal, progress)
        finally:
            journal.release()              # a run that failed (even before its first row) lets go

    def _into(self, journal, progress) -> GenerationSummary:
        pending = pending_indices(len(self.prompts), journal)
        ready = [i for i in pending if i in (self.answered or {})]
        with journal:
            for i in ready:
                journal.append(self.answered[i])
        pending = [i for i in pending if i not in (self.answered or {})]
        t0 = time.perf_counter()
        with open_source(self.recipe, len(pending), self.replicas, self.ray_address, self.replica_threads) as source:
            load_s = time.perf_counter() - t0
            params = [self.params[i] for i in pending] if isinstance(self.params, list) else self.params
            indices = pending if self.engine_index is None else [self.engine_index[i] for i in pending]
            completions = source.generate_iter([self.prompts[i] for i in pending], params,
                                               truncate=self.truncate, indices=indices) if pending else ()
            shown = (progress if pending else NoProgress)(len(self.prompts), journal.resumed)
            tally = write_completions(journal, completions, self.kept, on_row=shown.update, to_row=self.to_row)
            shown.close(tally)
            out = journal.finish(self.order)
            return GenerationSummary(
                rows=len(self.prompts), resumed_rows=journal.resumed, generated_rows=tally.rows + len(ready),
                prompt_tokens=tally.prompt_tokens, generated_tokens=tally.generated_tokens,
                load_s=round(load_s, 2), generate_s=round(tally.wall_s, 2),
                e2e_tokens_per_s=round(e2e_tokens_per_s(tally.generated_tokens, tally.wall_s), 1), out=str(out),
                details={**engine_figures(source), **({"failed": len(ready)} if self.answered is not None else {})})


def engine_figures(source) -> dict:
    """The engine's own figures (one engine here), or the replica count (none when nothing ran)."""
    if source is None or isinstance(source, Replicas):
        return {} if source is None else {"replicas": len(source.pids)}
    s = source.stats
    return {**s.as_dict(("prefill_tok_s", "decode_tok_s")), "parameters": source.model.num_parameters(),
            "dtype": dtype_name(source.model.dtype), **s.as_dict(("attention", "experts_skipped"))}
