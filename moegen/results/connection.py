"""Where the results database is and how it is opened: the URL, SQLite's settings for many
writers, the engines that write and read, and SQLAlchemy's errors as one line.

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
  INSERT ... ON CONFLICT DO NOTHING and then read back (moegen.results.recording).
Readers never write: they open SQLite read-only (a missing file is not created, an empty one is
not given a schema) and see a database without the schema as one without runs. A bad URL, a
missing driver, a file that is not a database or a server that cannot be reached is one line
naming the URL, its password masked (ResultsError: exit 2; ResultsUnreachable: exit 1).
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import re
import sqlite3
import time
import urllib.parse
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine, event, inspect as sa_inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session

from moegen.errors import MachineFault, MoegenError
from moegen.results.schema import Base, Run

URL_ENV = "MOEGEN_RESULTS_URL"
DEFAULT_PATH = Path("results") / "moegen.db"


class ResultsError(MoegenError):
    """A results-database request names a run that does not exist, or carries malformed data; or
    the database URL is malformed, its driver missing, its file not a database."""


class ResultsUnreachable(MachineFault):
    """The results database could not be reached or read (a server down, a disk error)."""


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
