"""Issue 23, cases 5, 12 and 15: the results database under concurrent writers (real processes,
every run recorded exactly once, on a fresh database and on one with its schema), and `moegen
results --db` on bad URLs, missing drivers, corrupt files and unreachable servers: one line naming
the URL with its password masked; reading never writes."""
import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moegen.cli import main
from moegen.results import connection, queries, recording

REPO = Path(__file__).resolve().parents[2]
PROCESSES, RUNS = 4, 30

# One writer: waits for `go`, so that every writer starts at once, then records RUNS runs whose
# environment, systems and workloads are shared with the other writers (the unique rows they race for).
WRITER = r"""
import os, sys, time
from moegen.results import recording
url, go, me, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
while not os.path.exists(go):
    time.sleep(0.005)
for j in range(runs):
    cells = [recording.CellResult("moegen", f"w{j % 3}", {"e2e": j}),
             recording.CellResult(f"sys{j % 5}", "w0", {"e2e": 1})]
    recording.record_run(f"writer{me}-run{j}", "bench", cells, hardware={"label": f"hw{j % 2}"}, versions={"v": 1},
                         url=url)
"""


def record_at_once(url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(go), str(i), str(RUNS)],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
             for i in range(PROCESSES)]
    time.sleep(3)                                  # every writer imported and waiting
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err


def recorded_models(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return sorted(m for (m,) in conn.execute("SELECT model FROM runs"))


@pytest.mark.parametrize("schema", ["fresh database", "schema in place"])
def test_concurrent_writers_record_every_run_exactly_once(tmp_path, schema):
    db = tmp_path / "r.db"
    url = f"sqlite:///{db}"
    if schema == "schema in place":
        connection.get_engine(url)
        connection.get_engine.cache_clear()
    record_at_once(url, tmp_path)
    expected = sorted(f"writer{i}-run{j}" for i in range(PROCESSES) for j in range(RUNS))
    assert recorded_models(db) == expected
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM environments").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM systems").fetchone()[0] == 6
        assert conn.execute("SELECT count(*) FROM results").fetchone()[0] == 2 * PROCESSES * RUNS
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---- bad URLs, drivers, files: one line, exit status, password masked -----------------------------

def results_cli(capsys, db: str) -> tuple[int, str]:
    status = main(["results", "--db", db])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err.strip()


def test_not_a_url(capsys):
    status, err = results_cli(capsys, "notaurl")
    assert status == 2 and "results database 'notaurl': not a database URL" in err and len(err.splitlines()) == 1


def test_a_missing_driver_names_the_extra(capsys, monkeypatch):
    real = connection._importable
    monkeypatch.setattr(connection, "_importable", lambda m: False if m.startswith("psycopg") else real(m))
    monkeypatch.setitem(sys.modules, "psycopg2", None)          # import psycopg2 -> ImportError
    status, err = results_cli(capsys, "postgresql://me:s3cret@db.example:5432/moegen")
    assert status == 2 and "driver is not installed" in err and "moegen[postgres]" in err
    assert "s3cret" not in err and "me:***@db.example" in err


def test_an_async_driver_is_refused(capsys):
    status, err = results_cli(capsys, "postgresql+asyncpg://me:s3cret@localhost/moegen")
    assert status == 2 and "asyncio driver" in err and "s3cret" not in err


def test_an_unreachable_server_is_a_machine_fault(capsys):
    pytest.importorskip("psycopg")
    status, err = results_cli(capsys, "postgresql://me:s3cret@127.0.0.1:9/moegen?connect_timeout=3")
    assert status == 1 and "cannot connect" in err and "s3cret" not in err and len(err.splitlines()) == 1


def test_a_corrupt_file_is_one_line(tmp_path, capsys):
    db = tmp_path / "corrupt.db"
    db.write_bytes(b"this is not sqlite at all" * 100)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    status, err = results_cli(capsys, f"sqlite:///{db}")
    assert status == 2 and "is not a SQLite database" in err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    with pytest.raises(connection.ResultsError, match="not a SQLite database"):
        recording.record_run("m", "bench", [], url=f"sqlite:///{db}")


def test_reading_never_writes(tmp_path, capsys):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    status, err = results_cli(capsys, f"sqlite:///{empty}")
    assert status == 0 and empty.stat().st_size == 0                     # no schema written into it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]    # nor a -wal / -shm beside it
    missing = tmp_path / "sub" / "missing.db"
    assert main(["results", "--db", f"sqlite:///{missing}"]) == 0
    assert "no runs in" in capsys.readouterr().out
    assert not missing.parent.exists()
    assert queries.history(url=f"sqlite:///{missing}") == []
    with pytest.raises(connection.ResultsError, match="no run 1"):
        queries.get_run(1, url=f"sqlite:///{missing}")


def test_a_database_written_then_read(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    run = recording.record_run("m", "bench", [recording.CellResult("moegen", "w", {"e2e_tokens_per_s": 5})], url=url)
    assert main(["results", "--db", url]) == 0
    assert "moegen" in capsys.readouterr().out
    assert queries.get_run(run, url=url)["results"][0]["metrics"] == {"e2e_tokens_per_s": 5.0}


# ---- the same on PostgreSQL, where the machine has a server to start ------------------------------

@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL cluster (initdb + pg_ctl as the `postgres` user, a Unix socket only)."""
    import shutil
    import tempfile
    pytest.importorskip("psycopg")
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None or os.geteuid() != 0:
        pytest.skip("no PostgreSQL server binaries here (or not root, to run them as `postgres`)")
    try:
        import pwd
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no `postgres` user to run the server as")
    base = Path(tempfile.mkdtemp(prefix="moegen-pg-"))
    os.chmod(base, 0o755)
    shutil.chown(base, "postgres")
    import socket
    with socket.socket() as sock:               # a port no one uses (the server listens on a socket file)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = base / "data"

    def as_postgres(*cmd):
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, timeout=120)

    try:
        as_postgres("initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
        as_postgres("pg_ctl", "-D", str(data), "-w", "-l", str(base / "log"), "-o",
                    f"-p {port} -k {base} -c listen_addresses=''", "start")
        yield f"postgresql://postgres@/postgres?host={base}&port={port}"
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", "pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_concurrent_writers_on_postgresql(tmp_path, postgres_url):
    record_at_once(postgres_url, tmp_path)
    import psycopg
    url = connection.parse_url(postgres_url)
    with psycopg.connect(host=url.query["host"], port=int(url.query["port"]), user="postgres",
                         dbname="postgres") as conn:
        models = sorted(m for (m,) in conn.execute("SELECT model FROM runs"))
        assert conn.execute("SELECT count(*) FROM environments").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM systems").fetchone()[0] == 6
    assert models == sorted(f"writer{i}-run{j}" for i in range(PROCESSES) for j in range(RUNS))
    assert len(queries.history(last=1000, url=postgres_url)) == PROCESSES * RUNS


def test_a_machine_fault_is_retried_by_the_flows_tasks_bad_input_is_not():
    from prefect.states import Failed

    from moegen.errors import InputError
    from tasks.common import retry_unless_bad_input
    assert retry_unless_bad_input(None, None, Failed(data=connection.ResultsUnreachable("db down"))) is True
    assert retry_unless_bad_input(None, None, Failed(data=InputError("bad row"))) is False
    assert retry_unless_bad_input(None, None, Failed(data=connection.ResultsError("notaurl"))) is False
