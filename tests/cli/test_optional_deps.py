"""The GPU machines have torch and transformers but none of the harness's own dependencies
(sqlalchemy, prefect, lm-eval, datasets): the CLI still runs there, and a command that needs a
missing package says which."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("sqlalchemy", "prefect", "lm_eval", "datasets", "ray"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name.split(".")[0])
sys.meta_path.insert(0, Block())
from moegen.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(*argv):
    return subprocess.run([sys.executable, "-c", BLOCK, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_cli_runs_without_the_harness_dependencies():
    listed = cli("--help")
    assert listed.returncode == 0 and "generate" in listed.stdout and "results" in listed.stdout
    generate = cli("generate", "--help")
    assert generate.returncode == 0 and "--device-memory" in generate.stdout, generate.stderr
    results = cli("results")
    assert results.returncode == 2 and "needs the package 'sqlalchemy'" in results.stderr
