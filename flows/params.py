"""Typed flow parameters. Prefect validates a flow's parameters against these types before the
flow starts (and the server checks a deployment run's parameters against their JSON schema), so
a bad value is rejected with a message naming it before any work is done."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, create_model,
                      model_validator)

from moegen.engine.config import DTYPE, Option
from moegen.engine.options import ENGINE_OPTIONS, config_of

DType = Literal[DTYPE.choices]
ProbeMode = Literal["quick", "full", "fresh", "off"]   # peaks for S-MFU/S-MBU (moegen.bench.systems.peaks.PROBE_MODES)
Device = Annotated[str, Field(pattern=r"^(cpu|cuda(:\d+)?)$", description="cpu, cuda or cuda:N")]
Threshold = Annotated[float, Field(gt=0, lt=1, description="relative drop that fails a nightly (0.1 = 10%)")]


def _accepted_by(parse, value):
    """value, if `parse` reads it; its MoegenError becomes the ValueError pydantic reports."""
    from moegen.errors import MoegenError
    try:
        parse(value)
    except MoegenError as e:
        raise ValueError(str(e)) from None
    return value


def check_model_ref(value: str) -> str:
    """A fixture spec, or a checkpoint directory that is there (on the machine the flow runs on:
    the worker's), so a missing model is refused before the flow starts, not in its first task."""
    from pathlib import Path

    from moegen.errors import CheckpointError
    from tasks.models import parse_fixture_spec

    def check(ref: str) -> None:
        if parse_fixture_spec(ref) is None and not (Path(ref).expanduser() / "config.json").is_file():
            raise CheckpointError(f"model {ref!r} is neither a fixture spec (fixture:<arch>/<preset>[@seed]) nor a "
                                  "checkpoint directory with config.json")
    return _accepted_by(check, value)


def check_bytes(value: str) -> str:
    """A size the engine reads (moegen.engine.memory.parse_bytes: 8GB, 512mb, 1.5g, ...)."""
    from moegen.engine.memory import parse_bytes
    return _accepted_by(parse_bytes, value)


def check_systems(names: list[str]) -> list[str]:
    from moegen.bench.systems import SYSTEMS
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    return names


def check_eval_systems(names: list[str]) -> list[str]:
    from moegen.eval.run import SYSTEMS
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown lm-eval backend(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    return names


def check_tasks(names: list[str]) -> list[str]:
    """lm-eval task names that exist (our local ones, or lm-eval's index): known before any work,
    not when the flow reaches its lm-eval task."""
    from moegen.eval.run import include_paths, task_manager
    return _accepted_by(lambda n: task_manager(n, include_paths(None)), names)


def check_workloads(specs: list[str]) -> list[str]:
    from moegen.bench.workloads import KINDS, workload_kind
    for spec in specs:
        kind = workload_kind(spec)
        if kind not in KINDS:
            raise ValueError(f"workload {spec!r}: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return specs


def check_workload(spec: str) -> str:
    return check_workloads([spec])[0]


def unique(values: list[str]) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate entries in {values}")
    return values


def check_results_url(url: str | None) -> str | None:
    from moegen.results.connection import check_url
    return _accepted_by(check_url, url)


ResultsURL = Annotated[str | None, Field(description="results database: a SQLAlchemy URL (default "
                                         "MOEGEN_RESULTS_URL, else SQLite at results/moegen.db)"),
                       AfterValidator(check_results_url)]
ModelRef = Annotated[str, Field(min_length=1, description="checkpoint directory, or fixture:<arch>/<preset>[@seed] "
                                "(built under runs/fixtures on first use)"), AfterValidator(check_model_ref)]
SystemNames = Annotated[list[str], Field(min_length=1), AfterValidator(unique), AfterValidator(check_systems)]
OptionalSystemNames = Annotated[list[str], AfterValidator(unique), AfterValidator(check_systems)]
EvalSystemNames = Annotated[list[str], Field(min_length=1), AfterValidator(unique),
                            AfterValidator(check_eval_systems)]
WorkloadSpecs = Annotated[list[str], Field(min_length=1), AfterValidator(unique), AfterValidator(check_workloads)]
WorkloadSpec = Annotated[str, AfterValidator(check_workload)]
ByteSize = Annotated[str, Field(min_length=1, description="bytes, e.g. 8GB, 512MB, 1.5GiB"), AfterValidator(check_bytes)]
TaskNames = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1), AfterValidator(unique),
                      AfterValidator(check_tasks)]


class _EngineOptionsBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def set_options(self) -> dict:
        return self.model_dump(exclude_none=True)

    @model_validator(mode="after")
    def _accepted_by_engine(self):
        """EngineConfig's own checks, those across options too (num_buffers with streaming)."""
        _accepted_by(config_of, self.set_options())
        return self


def parameter_type(option: Option):
    """The pydantic type of an engine option; the bounds it declares also go into the JSON schema
    that the server checks a deployment run's parameters against. PositiveInt for >= 1 keeps
    pydantic's message ("greater than 0")."""
    if option.kind == "int":
        return PositiveInt if option.minimum == 1 else Annotated[int, Field(ge=option.minimum)]
    if option.kind == "choice":
        return Literal[option.choices]
    return {"bytes": ByteSize, "bool": bool}.get(option.kind, str)


EngineOptions = create_model(
    "EngineOptions", __base__=_EngineOptionsBase, __module__=__name__,
    __doc__="moegen engine settings (None = the engine's own choice).",
    **{opt.name: (parameter_type(opt) | None, Field(None, description=opt.help)) for opt in ENGINE_OPTIONS})


class Sampling(BaseModel):
    """How each prompt is decoded (moegen.SamplingParams)."""
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: PositiveInt = 64
    temperature: Annotated[float, Field(ge=0)] = 0.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: NonNegativeInt = 0
    seed: int | None = None
    stop: list[Annotated[str, Field(min_length=1)]] = []
    ignore_eos: bool = False
    n: PositiveInt = Field(1, description="samples per prompt, forked from one prefill (a row's `samples`)")
    logprobs: NonNegativeInt | None = Field(None, description="per generated token: the chosen token's "
                                            "log-probability and this many alternatives")
    prompt_logprobs: NonNegativeInt | None = Field(None, description="likewise per prompt token")


class TaskRunnerChoice(BaseModel):
    """Where the bench matrix's cells run: threads here, or a Ray cluster (extra `cluster`)."""
    model_config = ConfigDict(extra="forbid")
    kind: Literal["thread", "ray"] = "thread"
    max_workers: PositiveInt = Field(1, description="thread runner: cells at once (1 = no two benchmarks "
                                     "share the machine)")
    ray_address: str | None = Field(None, description="ray runner: cluster address; None starts a local Ray")
    gpus_per_cell: Annotated[float, Field(ge=0)] = Field(0, description="ray runner: GPUs each cell reserves")
    cpus_per_cell: Annotated[float, Field(gt=0)] | None = Field(None, description="ray runner: CPUs each cell "
                                                                "reserves (default: all of a node's, so cells "
                                                                "do not share a CPU machine)")
