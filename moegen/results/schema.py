"""The results database's schema (SQLAlchemy 2), a small normalised one:

    environments  hardware label + JSON, library versions, git commit (one row per distinct set)
    runs          one recorded run: kind (bench | nightly | eval | generate), model, status, tags,
                  the Prefect flow run that made it, its environment
    systems       system names (moegen, hf-generate, ...)
    workloads     workload names (a bench workload spec, an lm-eval task)
    results       one (run, system, workload) cell: its config and, if it did not run, why
    metrics       one number of one cell (e2e_tok_s, decode_tok_s, s_mfu, accuracy, ...)

Where the database is and how it is opened: moegen.results.connection; writing a run:
moegen.results.recording; reading runs back: moegen.results.queries.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NIGHTLY = "nightly"
RUN_KINDS = ("bench", NIGHTLY, "eval", "generate")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class Environment(Base):
    __tablename__ = "environments"
    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    hardware: Mapped[str] = mapped_column(String(200), index=True)
    hardware_info: Mapped[dict[str, Any]]
    versions: Mapped[dict[str, Any]]
    git_commit: Mapped[str | None] = mapped_column(String(64))


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), index=True)
    model: Mapped[str] = mapped_column(String(500), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    status: Mapped[str] = mapped_column(String(20), default="ok")
    tags: Mapped[list[str]]
    flow_run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    environment_id: Mapped[int] = mapped_column(ForeignKey("environments.id"))
    environment: Mapped[Environment] = relationship()
    results: Mapped[list["Result"]] = relationship(back_populates="run", cascade="all, delete-orphan")


class SystemRow(Base):
    __tablename__ = "systems"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)


class WorkloadRow(Base):
    __tablename__ = "workloads"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(500), unique=True)


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("run_id", "system_id", "workload_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    system_id: Mapped[int] = mapped_column(ForeignKey("systems.id"))
    workload_id: Mapped[int] = mapped_column(ForeignKey("workloads.id"))
    config: Mapped[dict[str, Any]]
    skipped_reason: Mapped[str | None] = mapped_column(String(1000))
    run: Mapped[Run] = relationship(back_populates="results")
    system: Mapped[SystemRow] = relationship()
    workload: Mapped[WorkloadRow] = relationship()
    metrics: Mapped[list["Metric"]] = relationship(cascade="all, delete-orphan")


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("result_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[float | None] = mapped_column(Float)
