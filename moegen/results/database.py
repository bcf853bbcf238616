"""The results database: every benchmark, evaluation and generation run, queryable over time.

A small normalised schema (SQLAlchemy 2):

    environments  hardware label + JSON, library versions, git commit (one row per distinct set)
    runs          one recorded run: kind (bench | nightly | eval | generate), model, status, tags,
                  the Prefect flow run that made it, its environment
    systems       system names (moegen, hf-generate, ...)
    workloads     workload names (a bench workload spec, an lm-eval task)
    results       one (run, system, workload) cell: its config and, if it did not run, why
    metrics       one number of one cell (e2e_tok_s, decode_tok_s, s_mfu, accuracy, ...)

The database is embedded SQLite at `results/moegen.db` (relative to the working directory) in
WAL mode, or any SQLAlchemy URL given as an argument or in MOEGEN_RESULTS_URL (PostgreSQL for a
team: the `postgres` extra installs psycopg, and a plain postgresql:// URL uses it). Each recorded
run is written in one transaction: a failure part-way leaves nothing.

Many writers at once (several flows, processes or machines recording together), every run is
recorded exactly once:
- SQLite: WAL, a 30 s busy timeout, and every write transaction begun IMMEDIATE, so that writers
  queue for the write lock at BEGIN (a deferred transaction that reads first and then wants to
  write fails at once with "database is locked", whatever the timeout);
- the schema is created inside such a transaction (PostgreSQL: under an advisory lock), so two
  processes meeting a new database never both create a table;
- environments, systems and workloads, shared between runs by a unique key, are inserted with
  INSERT ... ON CONFLICT DO NOTHING and then read back.
Readers never write: they open SQLite read-only (a missing file is not created, an empty one is
not given a schema) and see a database without the schema as one without runs. A bad URL, a
missing driver, a file that is not a database or a server that cannot be reached is one line
naming the URL, its password masked (ResultsError: exit 2; ResultsUnreachable: exit 1).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import functools
import importlib.util
import inspect
import os
import re
import sqlite3
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import (JSON, DateTime, Float, ForeignKey, String, UniqueConstraint, create_engine, event,
                        inspect as sa_inspect, select, text)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from moegen.errors import MachineFault, MoegenError

URL_ENV = "MOEGEN_RESULTS_URL"
DEFAULT_PATH = Path("results") / "moegen.db"
NIGHTLY = "nightly"
RUN_KINDS = ("bench", NIGHTLY, "eval", "generate")


class ResultsError(MoegenError):
    """A results-database request names a run that does not exist, or carries malformed data; or
    the database URL is malformed, its driver missing, its file not a database."""


class ResultsUnreachable(MachineFault):
    """The results database could not be reached or read (a server down, a disk error)."""


# ---- schema -----------------------------------------------------------------------------------

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


# ---- what callers hand in -----------------------------------------------------------------------

@dataclass
class CellResult:
    """One (system, workload) cell of a run: its numbers, its config, or why it was skipped."""
    system: str
    workload: str
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    skipped_reason: str | None = None


# ---- connection ---------------------------------------------------------------------------------

def resolve_url(url: str | None = None) -> str:
    """The database URL: the argument, else MOEGEN_RESULTS_URL, else SQLite at results/moegen.db."""
    url = url or os.environ.get(URL_ENV)
    if url:
        return url
    return f"sqlite:///{DEFAULT_PATH.resolve()}"


def masked(url: str) -> str:
    """The URL as it may be shown: its password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:                                   # unparsable: mask anything like user:secret@
        return re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", str(url))


def parse_url(url: str | None = None) -> URL:
    """The resolved URL, parsed; the driver chosen (module doc); ResultsError when it cannot be used."""
    url = resolve_url(url)
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise ResultsError(f"results database {masked(url)!r}: not a database URL (a SQLite file is "
                           "sqlite:///path/to/file.db, a PostgreSQL server postgresql://user:password@host/db)") from None
    try:
        dialect = parsed.get_dialect()
    except sa_exc.NoSuchModuleError:
        raise ResultsError(f"results database {masked(url)}: unknown kind of database {parsed.drivername!r}") from None
    if getattr(dialect, "is_async", False):
        raise ResultsError(f"results database {masked(url)}: {parsed.drivername} is an asyncio driver, and moegen "
                           "writes synchronously: use postgresql:// (psycopg, the `postgres` extra)")
    # a plain postgresql:// means psycopg2 to SQLAlchemy; the `postgres` extra ships psycopg (3)
    if parsed.drivername == "postgresql" and not _importable("psycopg2") and _importable("psycopg"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def check_url(url: str | None) -> str | None:
    """A URL that can be used, checked without connecting: parsed, a known kind of database, a
    synchronous driver that is installed. ResultsError otherwise (flows check results_url with it
    before they start, not when they record at the end)."""
    if url is None:
        return None
    parsed = parse_url(url)
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError as e:
        hint = " (pip install 'moegen[postgres]')" if parsed.get_backend_name() == "postgresql" else ""
        raise ResultsError(f"results database {masked(url)}: its driver is not installed ({e.name or e}){hint}") from None
    return url


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def sqlite_path(url: str | None = None) -> Path | None:
    """The file behind a SQLite URL (None for other databases and in-memory SQLite)."""
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def reports_dir(url: str | None = None) -> Path:
    """Where reports (markdown, PNG plots) are written: MOEGEN_REPORTS_DIR, else `reports/` beside
    the SQLite file, else results/reports."""
    if os.environ.get("MOEGEN_REPORTS_DIR"):
        return Path(os.environ["MOEGEN_REPORTS_DIR"]).resolve()
    db = sqlite_path(url)
    return (db.parent if db else DEFAULT_PATH.parent.resolve()) / "reports"


def _sqlite_writer_pragmas(dbapi_connection, _record) -> None:
    # pysqlite's own transaction handling off: _begin_immediate says when a transaction starts
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")          # first: the WAL switch itself may wait
    _switch_to_wal(cursor)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _switch_to_wal(cursor, patience_s: float = 30.0) -> None:
    """WAL mode (kept in the file: a later connection finds it set). SQLite may refuse the switch
    at once with "database is locked" while another connection holds the fresh file, without
    calling the busy handler (it would deadlock), so the switch is retried for `patience_s`."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _begin_immediate(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_reader_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _create_engine(url: URL, **kwargs) -> Engine:
    try:
        return create_engine(url, **kwargs)
    except (ModuleNotFoundError, ImportError) as e:
        hint = " (pip install 'moegen[postgres]')" if url.get_backend_name() == "postgresql" else ""
        raise ResultsError(f"results database {masked(str(url))}: its driver is not installed "
                           f"({e.name or e}){hint}") from None


SCHEMA_LOCK_KEY = 23_5707_2026            # PostgreSQL advisory lock held while creating the schema


@lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    """The engine that writes (one per URL), with the schema created on first use."""
    parsed = parse_url(url)
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = _create_engine(parsed)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_writer_pragmas)
        event.listen(engine, "begin", _begin_immediate)
    with _database_errors(str(parsed)), engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        Base.metadata.create_all(conn)
    return engine


def get_reader(url: str | None = None) -> Engine | None:
    """An engine that only reads, or None when there is no database there yet. SQLite is opened
    read-only: nothing is created, not even the file."""
    parsed = parse_url(url)
    path = sqlite_path(url)
    if parsed.get_backend_name() != "sqlite":
        return _reader_engine(parsed.render_as_string(hide_password=False))
    if path is None:
        return get_engine(url)                        # in-memory: only the writer's own database exists
    if not path.is_file():
        return None
    return _reader_engine(f"sqlite:///file:{urllib.parse.quote(str(path.resolve()))}?mode=ro&uri=true")


@lru_cache(maxsize=8)
def _reader_engine(url: str) -> Engine:
    engine = _create_engine(make_url(url))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_reader_pragmas)
    return engine


@contextmanager
def reading(url: str | None = None):
    """A read-only Session, or None when the database has no runs table (nothing recorded yet)."""
    engine = get_reader(url)
    if engine is None:
        yield None
        return
    with _database_errors(resolve_url(url)), engine.connect() as conn:
        if not sa_inspect(conn).has_table(Run.__tablename__):
            yield None
            return
        with Session(bind=conn) as session:
            yield session


@contextmanager
def _database_errors(url: str):
    """SQLAlchemy's errors as one line naming the (masked) URL (module doc)."""
    try:
        yield
    except sa_exc.SQLAlchemyError as e:
        raise database_error(url, e) from e


def database_error(url: str, e: Exception) -> MoegenError:
    orig = getattr(e, "orig", None) or e
    reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    where = f"results database {masked(url)}"
    if "file is not a database" in reason:
        return ResultsError(f"{where}: the file is not a SQLite database ({reason})")
    if isinstance(e, (sa_exc.OperationalError, sa_exc.InterfaceError)) and make_url(url).get_backend_name() != "sqlite":
        return ResultsUnreachable(f"{where}: cannot connect ({reason})")
    if isinstance(e, sa_exc.OperationalError) and "unable to open database file" in reason:
        return ResultsError(f"{where}: cannot open the file ({reason})")
    return ResultsUnreachable(f"{where}: {reason}")


def database_call(fn):
    """Any SQLAlchemy error of fn as database_error's one line; fn takes the URL as `url`."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except sa_exc.SQLAlchemyError as e:
            bound = signature.bind_partial(*args, **kwargs)
            raise database_error(resolve_url(bound.arguments.get("url")), e) from e
    return call


# ---- writing ------------------------------------------------------------------------------------

def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    value = float(value)
    return None if math.isnan(value) else value


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float | None]:
    """Numbers of a (possibly nested) metrics dict under dotted names; non-numbers are dropped."""
    flat: dict[str, float | None] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, prefix=f"{name}."))
        elif value is None or isinstance(value, (int, float)) or hasattr(value, "__float__"):
            flat[name] = None if value is None else _as_float(value)
    return flat


def hardware_label(hardware: Any) -> str:
    """A short, stable name for the machine: the GPU if there is one, else the CPU model and count.
    Takes moegen.bench.run's hardware object ({"cpu": {...}, "gpu": {...}}), probe.machine_info's, or a str."""
    if isinstance(hardware, str):
        return hardware
    if not isinstance(hardware, dict) or not hardware:
        return "unknown"
    if hardware.get("label"):
        return str(hardware["label"])
    gpu, cpu = hardware.get("gpu") or {}, hardware.get("cpu") or {}
    if gpu.get("name") or hardware.get("gpu_name"):
        return str(gpu.get("name") or hardware["gpu_name"])
    model = cpu.get("model") or hardware.get("cpu_model") or "cpu"
    count = cpu.get("count") or hardware.get("cpu_count")
    return f"{model} x{count}" if count else str(model)


def _insert_or_get(session: Session, model, key: str, **values) -> int:
    """The id of the row whose unique `key` column equals values[key], inserted if absent. Safe
    with concurrent writers: INSERT ... ON CONFLICT DO NOTHING, then read back (elsewhere a
    savepoint around the insert, its IntegrityError meaning another writer was first)."""
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        insert = importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert
        session.execute(insert(model).values(**values).on_conflict_do_nothing(index_elements=[key]))
    elif session.scalars(select(model.id).filter_by(**{key: values[key]})).first() is None:
        try:
            with session.begin_nested():
                session.add(model(**values))
        except sa_exc.IntegrityError:
            pass
    return session.scalars(select(model.id).filter_by(**{key: values[key]})).one()


def _environment(session: Session, hardware: Any, versions: dict, git_commit: str | None) -> int:
    info = hardware if isinstance(hardware, dict) else {"label": hardware_label(hardware)}
    blob = json.dumps([hardware_label(hardware), versions, git_commit], sort_keys=True, default=str)
    fingerprint = hashlib.sha256(blob.encode()).hexdigest()
    return _insert_or_get(session, Environment, "fingerprint", fingerprint=fingerprint,
                          hardware=hardware_label(hardware), hardware_info=json.loads(json.dumps(info, default=str)),
                          versions=json.loads(json.dumps(versions, default=str)), git_commit=git_commit)


def _add_cell(session: Session, run: Run, cell: CellResult) -> None:
    result = Result(system_id=_insert_or_get(session, SystemRow, "name", name=cell.system),
                    workload_id=_insert_or_get(session, WorkloadRow, "name", name=cell.workload),
                    config=json.loads(json.dumps(cell.config, default=str)), skipped_reason=cell.skipped_reason)
    run.results.append(result)
    for name, value in flatten_metrics(cell.metrics).items():
        result.metrics.append(Metric(name=name, value=value))
    session.flush()


@database_call
def record_run(model: str, kind: str, cells: Iterable[CellResult], hardware: Any = None,
               versions: dict | None = None, git_commit: str | None = None, tags: Iterable[str] = (),
               status: str = "ok", flow_run_id: str | None = None, created_at: dt.datetime | None = None,
               url: str | None = None) -> int:
    """Write one run with all its cells and metrics in a single transaction; return its id."""
    if kind not in RUN_KINDS:
        raise ResultsError(f"run kind must be one of {', '.join(RUN_KINDS)}, not {kind!r}")
    with Session(get_engine(url)) as session, session.begin():
        run = Run(kind=kind, model=str(model), status=status, tags=sorted(set(tags)),
                  flow_run_id=flow_run_id, created_at=created_at or dt.datetime.now(dt.timezone.utc),
                  environment_id=_environment(session, hardware, versions or {}, git_commit))
        session.add(run)
        for cell in cells:
            _add_cell(session, run, cell)
        session.flush()
        return run.id


def _bench_systems(bench: dict) -> list[dict]:
    if not isinstance(bench.get("systems"), list):
        raise ResultsError("bench JSON has no 'systems' list (one object per system)")
    return bench["systems"]


def _workload_name(workload: Any) -> str:
    """A workload's spec string (what the user asked for, the same night after night)."""
    if isinstance(workload, dict):
        return str(workload.get("spec") or workload.get("name") or json.dumps(workload, sort_keys=True))
    if not workload:
        raise ResultsError("bench JSON names no workload")
    return str(workload)


def _skipped_reason(body: dict) -> str | None:
    if body.get("skipped_reason"):
        return str(body["skipped_reason"])
    if body.get("status", "ok") != "ok":
        return f"{body['status']}: {body.get('reason') or 'no reason given'}"
    return None


def bench_cells(bench: dict) -> list[CellResult]:
    """The cells of a `moegen.bench.run.run_bench` result: one per system on its workload."""
    workload = _workload_name(bench.get("workload") or (bench.get("config") or {}).get("workload"))
    cells = []
    for body in _bench_systems(bench):
        name = body.get("system") or body.get("name")
        if not name:
            raise ResultsError("a bench system object has no 'system' name")
        cells.append(CellResult(system=str(name), workload=workload, metrics=dict(body.get("metrics") or {}),
                                config=body.get("config") or {}, skipped_reason=_skipped_reason(body)))
    return cells


def git_commit_of(doc: dict) -> str | None:
    """The commit a bench/eval JSON was made at (`git_commit`, `commit` or `git.commit`)."""
    commit = doc.get("git_commit") or doc.get("commit")
    if isinstance(doc.get("git"), dict):
        commit = commit or doc["git"].get("commit")
    return commit


def record_bench(bench: dict, kind: str = "bench", tags: Iterable[str] = (), model: str | None = None,
                 status: str = "ok", flow_run_id: str | None = None, url: str | None = None) -> int:
    """Record a bench result (the JSON of `moegen.bench.run.run_bench`, or several merged)."""
    model = model or bench.get("model") or (bench.get("config") or {}).get("model")
    if not model:
        raise ResultsError("bench JSON names no model and none was given")
    return record_run(model, kind, bench_cells(bench), hardware=bench.get("hardware"),
                      versions=bench.get("versions") or {}, git_commit=git_commit_of(bench), tags=tags,
                      status=status, flow_run_id=flow_run_id, url=url)


# lm-eval metrics that stand for a task's accuracy, preferred first (strict match over the lenient
# extraction); cells store them with "." for lm-eval's "," (see eval_cells)
HEADLINE_ACCURACY = ("exact_match,strict-match", "exact_match,flexible-extract", "acc,none", "exact_match,none")


def headline_accuracy(metrics: dict) -> float | None:
    """One task's accuracy from its lm-eval metrics (either separator), or a cell's `accuracy`."""
    if isinstance(metrics.get("accuracy"), (int, float)):
        return float(metrics["accuracy"])
    named = {k.replace(".", ",", 1): v for k, v in metrics.items()}
    return next((float(named[k]) for k in HEADLINE_ACCURACY if isinstance(named.get(k), (int, float))), None)


def eval_cells(evaluation: dict, system: str | None = None) -> list[CellResult]:
    """The cells of an evaluation: one per lm-eval task, holding that task's metrics."""
    results = evaluation.get("results")
    if not isinstance(results, dict) or not results:
        raise ResultsError("eval JSON has no 'results' (lm-eval metrics per task)")
    system = system or evaluation.get("system") or "moegen"
    config = {k: evaluation[k] for k in ("limit", "num_fewshot", "dtype", "device") if k in evaluation}
    return [CellResult(system=str(system), workload=task, config=config,
                       metrics={k.replace(",", "."): v for k, v in metrics.items() if k != "alias"})
            for task, metrics in results.items()]


def record_eval(evaluation: dict | list[dict], model: str | None = None, tags: Iterable[str] = (),
                extra_cells: Iterable[CellResult] = (), status: str = "ok", flow_run_id: str | None = None,
                url: str | None = None) -> int:
    """Record one or more `moegen.eval.run.run_eval` results (one per system) as one eval run;
    `extra_cells` adds cells such as the throughput of a short bench beside the accuracy."""
    docs = [evaluation] if isinstance(evaluation, dict) else list(evaluation)
    if not docs:
        raise ResultsError("record_eval got no evaluation results")
    model = model or docs[0].get("model")
    if not model:
        raise ResultsError("eval JSON names no model and none was given")
    cells = [cell for doc in docs for cell in eval_cells(doc)] + list(extra_cells)
    first = docs[0]
    return record_run(model, "eval", cells, hardware=first.get("hardware"), versions=first.get("versions") or {},
                      git_commit=git_commit_of(first), tags=tags, status=status, flow_run_id=flow_run_id, url=url)


# ---- reading ------------------------------------------------------------------------------------

def _result_dict(result: Result) -> dict:
    return {"system": result.system.name, "workload": result.workload.name, "config": result.config,
            "skipped_reason": result.skipped_reason, "metrics": {m.name: m.value for m in result.metrics}}


def _run_dict(run: Run) -> dict:
    env = run.environment
    return {"id": run.id, "kind": run.kind, "model": run.model, "created_at": run.created_at.isoformat(),
            "status": run.status, "tags": run.tags, "flow_run_id": run.flow_run_id, "hardware": env.hardware,
            "git_commit": env.git_commit, "versions": env.versions,
            "results": [_result_dict(r) for r in run.results]}


@database_call
def get_run(run_id: int, url: str | None = None) -> dict:
    """One run with its environment, cells and metrics."""
    with reading(url) as session:
        run = session.get(Run, int(run_id)) if session is not None else None
        if run is None:
            raise ResultsError(f"no run {run_id} in {masked(resolve_url(url))}")
        return _run_dict(run)


@database_call
def history(last: int = 20, kind: str | None = None, model: str | None = None, system: str | None = None,
            workload: str | None = None, hardware: str | None = None, tag: str | None = None,
            flow_run_id: str | None = None, url: str | None = None) -> list[dict]:
    """The `last` runs matching the filters, newest first, each with its cells and metrics."""
    query = select(Run).join(Run.environment).order_by(Run.created_at.desc(), Run.id.desc())
    for column, value in ((Run.kind, kind), (Run.model, model), (Environment.hardware, hardware),
                          (Run.flow_run_id, flow_run_id)):
        if value is not None:
            query = query.where(column == value)
    if system is not None:
        query = query.where(Run.results.any(Result.system.has(SystemRow.name == system)))
    if workload is not None:
        query = query.where(Run.results.any(Result.workload.has(WorkloadRow.name == workload)))
    if tag is None:
        query = query.limit(last)
    with reading(url) as session:
        if session is None:
            return []
        runs = [run for run in session.scalars(query) if tag is None or tag in run.tags]   # tags: a JSON list
        return [_run_dict(run) for run in runs[:last]]


def compare(run_a: int, run_b: int, url: str | None = None) -> list[dict]:
    """Metric by metric, the cells the two runs share: a, b and b/a (None where a is 0 or missing)."""
    a, b = get_run(run_a, url), get_run(run_b, url)
    b_cells = {(c["system"], c["workload"]): c["metrics"] for c in b["results"]}
    rows = []
    for cell in a["results"]:
        other = b_cells.get((cell["system"], cell["workload"]))
        if other is None:
            continue
        for name in sorted(set(cell["metrics"]) | set(other)):
            va, vb = cell["metrics"].get(name), other.get(name)
            ratio = vb / va if va not in (None, 0) and vb is not None else None
            rows.append({"system": cell["system"], "workload": cell["workload"], "metric": name,
                         "a": va, "b": vb, "ratio": ratio})
    return rows


BASELINE_NIGHTLIES = 5


@database_call
def nightly_baseline(model: str, system: str, workload: str, hardware: Any, last: int = BASELINE_NIGHTLIES,
                     before_run: int | None = None, url: str | None = None) -> dict | None:
    """The last `last` healthy nightlies of this (model, system, workload) on the same hardware,
    newest first: {"runs": [id], "created_at": [iso], "metrics": {name: [value per run]}}; None if
    there is none. Healthy: the run's status is "ok" (a regressed nightly never joins the baseline,
    so a real regression keeps alarming) and the cell ran. `before_run` excludes that run and later."""
    query = (select(Run, Result).join(Run.environment).join(Run.results).join(Result.system).join(Result.workload)
             .where(Run.kind == NIGHTLY, Run.status == "ok", Run.model == str(model), SystemRow.name == system,
                    WorkloadRow.name == workload, Environment.hardware == hardware_label(hardware),
                    Result.skipped_reason.is_(None))
             .order_by(Run.created_at.desc(), Run.id.desc()))
    if before_run is not None:
        query = query.where(Run.id < int(before_run))
    with reading(url) as session:
        rows = session.execute(query.limit(max(1, int(last)))).all() if session is not None else []
        if not rows:
            return None
        metrics: dict[str, list] = {}
        for _, result in rows:
            for m in result.metrics:
                metrics.setdefault(m.name, []).append(m.value)
        return {"runs": [run.id for run, _ in rows], "created_at": [run.created_at.isoformat() for run, _ in rows],
                "metrics": metrics}


@database_call
def nightly_series(model: str, metric: str, last: int = 30, url: str | None = None) -> dict[tuple, list]:
    """(system, workload, hardware) -> [(created_at, value, status)] of the last `last` nightlies
    of `model`, oldest first: the trend the nightly report plots."""
    query = (select(Run, Result, SystemRow.name, WorkloadRow.name, Environment.hardware)
             .join(Run.environment).join(Run.results).join(Result.system).join(Result.workload)
             .where(Run.kind == NIGHTLY, Run.model == str(model), Result.skipped_reason.is_(None))
             .order_by(Run.created_at.desc(), Run.id.desc()))
    series: dict[tuple, list] = {}
    with reading(url) as session:
        for run, result, system, workload, hardware in session.execute(query) if session is not None else ():
            value = next((m.value for m in result.metrics if m.name == metric), None)
            points = series.setdefault((system, workload, hardware), [])
            if value is not None and len(points) < last:
                points.append((run.created_at, value, run.status))
    return {key: points[::-1] for key, points in series.items() if points}
