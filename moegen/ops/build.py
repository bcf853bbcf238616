"""Build and load moegen's native CPU kernels (csrc/) on first use.

The shared library is compiled with ``torch.utils.cpp_extension`` into
``$XDG_CACHE_HOME/moegen/ops/<key>`` (``~/.cache`` when unset), where ``<key>`` hashes
everything that changes the binary: the sources and the headers they include, torch and
Python versions, the compiler, the flags and the host CPU (the code is built with
``-march=native``). A later process finds the finished library there and loads it without
compiling or even needing ninja.

``MOEGEN_NATIVE=0`` disables the native path; ``MOEGEN_OPS_CFLAGS`` appends compiler
flags (e.g. ``-DMOEGEN_SIMD_AVX2`` to force the AVX2 code on an AVX-512 machine).
A build that fails never raises: it emits one warning naming the log file holding the
compiler output, and callers use the PyTorch fallback.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from moegen.ops import cpu

try:
    import fcntl
except ImportError:  # not POSIX: builds are then only serialised by torch's own lock file
    fcntl = None

CSRC = Path(__file__).resolve().parents[2] / "csrc"
# one library: decode attention (defines the op namespace) + fused elementwise ops, the
# dequantization of quantized weights, the routed experts of a MoE layer and prefill attention
# (fragments)
SOURCES = (CSRC / "decode_attention.cpp", CSRC / "elementwise.cpp", CSRC / "dequant.cpp", CSRC / "experts.cpp",
           CSRC / "experts_int8.cpp", CSRC / "prefill_attention.cpp")
# what the sources #include from csrc/: hashed with them and snapshotted beside them, not compiled
HEADERS = (CSRC / "simd.h", CSRC / "amx.h", CSRC / "experts.h")
NAMESPACE = "moegen_ops"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-DNDEBUG")
# libgomp shares its SONAME with the copy torch bundles, so both resolve to one OpenMP runtime.
LDFLAGS = ("-fopenmp",)
_DONE_MARKER = "build.ok"
_registration_lock = threading.Lock()


@dataclass(frozen=True)
class NativeOps:
    """A loaded native library: ``ops`` is its ``torch.ops`` namespace."""

    impl: str
    path: Path
    ops: object

    def __str__(self) -> str:
        return f"{self.impl} ({self.path})"


@dataclass(frozen=True)
class BuildResult:
    """What ``build_ops`` reports; ``str()`` of it is one printable line."""

    impl: str
    path: Path | None = None
    log: Path | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.impl != "torch"

    def __str__(self) -> str:
        if self.ok:
            return f"{self.impl}: {self.path}"
        where = f"; compiler output in {self.log}" if self.log else ""
        return f"torch (native kernels unavailable: {self.reason}{where})"


def native_enabled() -> bool:
    return os.environ.get("MOEGEN_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moegen" / "ops"


def extra_cflags_from_env() -> tuple[str, ...]:
    return tuple(shlex.split(os.environ.get("MOEGEN_OPS_CFLAGS", "")))


def _compiler_identity() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        run = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return cxx + "\n" + run.stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{cxx}: {exc}"  # the build will fail and report it properly


def _cpu_identity() -> str:
    # -march=native bakes the host's ISA into the binary: a different CPU needs a new build.
    return cpu.identity() or platform.processor() + platform.machine()


def build_key(source: Path | bytes, cflags: tuple[str, ...], ldflags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (
        source if isinstance(source, bytes) else source.read_bytes(),   # all sources' bytes
        torch.__version__.encode(),
        sys.implementation.cache_tag.encode(),
        platform.machine().encode(),
        _compiler_identity().encode(),
        _cpu_identity().encode(),
        "\0".join(cflags).encode(),
        "\0".join(ldflags).encode(),
    ):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:20]


def _write_log(build_dir: Path, text: str) -> Path:
    for directory in (build_dir, Path(tempfile.gettempdir())):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            log = directory / "build.log"
            log.write_text(text, encoding="utf-8")
            return log
        except OSError:
            continue
    return build_dir / "build.log"  # unwritable everywhere: still name where we tried


def _open_library(path: Path, namespace: str) -> NativeOps:
    with _registration_lock:  # op registration is global state; keep concurrent loads apart
        torch.ops.load_library(str(path))
    ops = getattr(torch.ops, namespace)
    return NativeOps(impl=str(ops.impl_name()), path=path, ops=ops)


@contextlib.contextmanager
def _exclusive(build_dir: Path):
    """One builder per build dir across processes. flock dies with its holder, unlike the lock
    file torch's builder uses, which a killed build leaves behind to block everyone forever."""
    if fcntl is None:
        yield
        return
    with open(build_dir / "moegen.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(codes: dict[str, bytes], build_dir: Path, name: str, cflags, ldflags, verbose: bool) -> Path:
    from torch.utils import cpp_extension  # imported lazily: it is slow to import

    lib = build_dir / f"{name}.so"
    build_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(build_dir):
        if (build_dir / _DONE_MARKER).is_file() and lib.is_file():
            return lib  # another process built it while we waited
        if fcntl is not None:  # we hold the dir: a torch lock file here is stale
            (build_dir / "lock").unlink(missing_ok=True)
        # Compile a snapshot of exactly the hashed bytes (headers included: the sources find
        # them beside themselves), so an edit during the build cannot be cached under the old key.
        for file_name, code in codes.items():
            (build_dir / file_name).write_bytes(code)
        cpp_extension.load(
            name=name,
            sources=[str(build_dir / n) for n in codes if not n.endswith(".h")],
            extra_cflags=list(cflags),
            extra_ldflags=list(ldflags),
            build_directory=str(build_dir),
            verbose=verbose,
            is_python_module=False,
        )
        (build_dir / _DONE_MARKER).write_text(str(lib), encoding="utf-8")
    return lib


def _failure_reason(exc: BaseException) -> str:
    """The compiler's first error line if there is one, else the exception's first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln or "Error:" in ln:
            return ln[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _try_load(sources: tuple[Path, ...], extra_cflags: tuple[str, ...], namespace: str, verbose: bool):
    """Returns (NativeOps, None) or (None, BuildResult describing the failure)."""
    cflags = CFLAGS + (f"-DMOEGEN_OPS_NS={namespace}",) + tuple(extra_cflags)
    codes = {}
    # the headers beside the sources (another tree's sources, e.g. an A/B variant's, with its own
    # headers; one that tree does not have it does not include)
    headers = tuple(h for h in (sources[0].parent / h.name for h in HEADERS) if h.is_file())
    for source in sources + headers:
        try:
            codes[source.name] = source.read_bytes()
        except OSError:
            return None, BuildResult("torch", reason=f"kernel source {source} not found")
    key = build_key(b"\0".join(name.encode() + b"\0" + code for name, code in codes.items()), cflags, LDFLAGS)
    build_dir = cache_root() / key
    name = f"{namespace}_{key}"
    lib = build_dir / f"{name}.so"
    try:
        if not ((build_dir / _DONE_MARKER).is_file() and lib.is_file()):
            lib = _compile(codes, build_dir, name, cflags, LDFLAGS, verbose)
        return _open_library(lib, namespace), None
    except Exception as exc:  # noqa: BLE001 - any failure means "use the fallback"
        text = (
            f"moegen native ops build failed\nsources: {', '.join(map(str, sources))}\nbuild dir: {build_dir}\n"
            f"cflags: {' '.join(cflags)}\nldflags: {' '.join(LDFLAGS)}\ntorch: {torch.__version__}\n\n"
            + "".join(traceback.format_exception(exc))
        )
        log = _write_log(build_dir, text)
        return None, BuildResult("torch", log=log, reason=_failure_reason(exc))


def load_native(
    *,
    source: Path | tuple[Path, ...] = SOURCES,
    extra_cflags: tuple[str, ...] = (),
    namespace: str = NAMESPACE,
    verbose: bool = False,
) -> NativeOps | None:
    """Builds (or finds in the cache) and loads the library; uncached, for tests and variants.

    On failure warns once, naming the log file, and returns None. Each distinct
    ``namespace`` may be loaded once per process (ops namespaces are global).
    """
    sources = (source,) if isinstance(source, Path) else tuple(source)
    ops, failure = _try_load(sources, tuple(extra_cflags), namespace, verbose)
    if ops is None:
        where = f" Compiler output: {failure.log}" if failure.log else ""
        warnings.warn(
            f"moegen: native CPU kernels unavailable ({failure.reason}); using the "
            f"slower PyTorch fallback.{where}",
            RuntimeWarning,
            stacklevel=3,
        )
        _record_failure(failure)
    return ops


_UNSET = object()
_lock = threading.Lock()
_loaded: object = _UNSET
_last_failure: BuildResult | None = None


def _record_failure(failure: BuildResult) -> None:
    global _last_failure
    _last_failure = failure


def native_ops(verbose: bool = False) -> NativeOps | None:
    """The process-wide native library, built on first use; None when disabled or unbuildable."""
    global _loaded
    if not native_enabled():
        return None
    if _loaded is _UNSET:
        with _lock:  # one build per process, however many threads ask at once
            if _loaded is _UNSET:
                _loaded = load_native(extra_cflags=extra_cflags_from_env(), verbose=verbose)
    return _loaded  # type: ignore[return-value]


def reset() -> None:
    """Forgets the loaded library so the next call retries (tests; a loaded .so stays mapped)."""
    global _loaded, _last_failure
    with _lock:
        _loaded = _UNSET
        _last_failure = None


def build_ops(verbose: bool = False) -> BuildResult:
    """Builds the native kernels ahead of time (``moegen build-ops``) and reports what runs."""
    if not native_enabled():
        return BuildResult("torch", reason="disabled by MOEGEN_NATIVE=0")
    ops = native_ops(verbose=verbose)
    if ops is None:
        return _last_failure or BuildResult("torch", reason="build failed")
    return BuildResult(ops.impl, path=ops.path)
