"""One step of the GPU check (benchmarks/gpu_check.sh runs every step, each in a process of its own).

    PYTHONPATH=. python benchmarks/gpu_check.py STEP [VARIANT] --out DIR [--rehearse]

Steps: ops (the native build), exact (float32 greedy tokens = transformers, every architecture,
weights streamed), quantized (fp8 / int4 streamed = the same model resident on the CPU), features
(prefix caching, logprobs, n samples), footprint bf16|fp8 (peak host RSS over weights + KV cache,
streamed), throughput mixtral|v2lite (moegen streamed and resident vs hf-generate and hf-offload at
the same device budget). Each prints one line per check, `PASS name: ...` or `FAIL name: ...`, and
writes DIR/STEP[-VARIANT].json. Checkpoints are random weights of the fixture configs written with
transformers (no tokenizer: prompts are token ids).

--rehearse runs the same steps on the CPU, weights streamed by the staged backend (a CPU stand-in
for the device, with the same device budget and resident choice), at sizes these 2 cores run in
minutes: the script itself is tested wherever there is no GPU.
"""
import argparse
import ctypes
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.engine.weight_setup import DEQUANT_TEMPORARIES, device_reserve
from moegen.engine.weight_stream import group_weights, module_bytes
from moegen.checkpoints.fixture import ARCHS, fixture_config
from moegen.layers.quantized import is_quantized, tensors_of
from moegen.loader import config_from, dummy_model, load_model

# Sizes per mode: the GPU run fits ~8 minutes on an H100 with its build, the rehearsal ~5 on 2 cores.
SIZES = {
    "cuda": dict(preset="small", prompts=8, new_tokens=32, fp_layers=10, fp_n=64, fp_prompt=256, fp_gen=32,
                 mixtral_n=256, v2_n=64, tp_prompt=128, tp_gen=32, v2_layers=6, v2_budget=3 << 30, kv=4 << 30,
                 v2_experts=64),
    "rehearse": dict(preset="tiny", prompts=4, new_tokens=8, fp_layers=2, fp_n=4, fp_prompt=32, fp_gen=4,
                     mixtral_n=8, v2_n=4, tp_prompt=16, tp_gen=4, v2_layers=2, v2_budget=None, kv=256 << 20,
                     v2_experts=16),
}
FIXED = dict(max_batch=64, attn_micro_batch=16, max_prefill_tokens=4096)    # no probe: settings fixed
LOGPROB_TOL = 1e-4
RSS_LIMIT = 1.2


class Check:
    """Collects a step's results and prints one PASS/FAIL line per check."""

    def __init__(self, out: Path, name: str, mode: str):
        self.path, self.mode = out / f"{name}.json", mode
        self.result = {"step": name, "mode": mode, "torch": torch.__version__, "checks": []}
        if mode == "cuda":
            self.result["device"] = torch.cuda.get_device_name()

    def record(self, name: str, ok: bool, detail: str, **data) -> None:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        self.result["checks"].append({"name": name, "ok": bool(ok), "detail": detail, **data})
        self.path.write_text(json.dumps(self.result, indent=1, default=str))


def device_of(mode: str) -> str:
    return "cuda" if mode == "cuda" else "cpu"


def engine(model, mode: str, budget: int | None, kv: int, **kw) -> Engine:
    """Streamed within `budget` (None: everything resident; on the CPU, resident = plain CPU engine)."""
    settings = {**FIXED, **kw}
    if mode == "cuda":
        streaming = "resident" if budget is None else "auto"
        cfg = EngineConfig(device="cuda", device_memory=budget, streaming=streaming, kv_cache_bytes=kv, **settings)
    elif budget is None:
        cfg = EngineConfig(kv_cache_bytes=kv, prepack=False, experts_kernel="torch", **settings)
    else:
        cfg = EngineConfig(streaming="staged", device_memory=budget, kv_cache_bytes=kv, **settings)
    return Engine(model, None, cfg)


def streamed_budget(model, mode: str, share: float, buffers: int = 4, **kw) -> int:
    """A device budget holding the embeddings and lm_head, the buffers and `share` of the other
    weights, plus (CUDA) the engine's reserve: the rest must stream."""
    sizes = {k: module_bytes(g) for k, g in group_weights(model.weights).items()}
    rest = {k: v for k, v in sizes.items() if k != "model"}
    weights_room = sizes["model"] + buffers * max(rest.values()) + int(share * sum(rest.values()))
    if mode != "cuda":
        return weights_room
    cfg, budget = EngineConfig(device="cpu", **{**FIXED, **kw}), weights_room
    for _ in range(4):          # the reserve grows with the budget (a share for fragmentation)
        budget = weights_room + device_reserve(model, cfg, budget)
    return budget


def v2lite(layers: int, experts: int):
    """DeepSeek-V2-Lite's shapes with fewer layers (its first is dense; each other, with all 64
    experts, ~1.1 GB in bf16) and, for the rehearsal, fewer experts."""
    from moegen.configs import load_config
    return config_from(dict(load_config("deepseek-v2-lite"), num_hidden_layers=layers, n_routed_experts=experts))


def write_checkpoint(config, root: Path, name: str, dtype=torch.float32) -> Path:
    from transformers import AutoModelForCausalLM
    path = root / name
    if (path / "model.safetensors.index.json").exists() or (path / "model.safetensors").exists():
        return path
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):    # random init is fast on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, max_shard_size="4GB")
    return path


def prompts(n: int, length_of, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (length_of(i) - 1,), generator=g).tolist() for i in range(n)]


def streamed_stats(e: Engine) -> str:
    s = e.streamer
    return (f"{len(s.resident)}/{len(s.groups)} modules resident, {s.stats.bytes_moved / 2**20:.1f} MiB streamed, "
            f"{e.stats.experts_skipped} experts skipped")


# --- steps -----------------------------------------------------------------------------------------

def step_ops(check: Check, mode: str, sizes: dict, work: Path) -> None:
    from moegen.ops.build import build_ops
    t0 = time.perf_counter()
    built = build_ops()
    check.record("native-ops", built.ok, f"{built} in {time.perf_counter() - t0:.0f} s", impl=built.impl,
                 seconds=time.perf_counter() - t0)


@torch.inference_mode()
def step_exact(check: Check, mode: str, sizes: dict, work: Path) -> None:
    from transformers import AutoModelForCausalLM
    device, n_new = device_of(mode), sizes["new_tokens"]
    for arch in ARCHS:
        path = write_checkpoint(fixture_config(arch, sizes["preset"]), work, f"{arch}-{sizes['preset']}")
        ps = prompts(sizes["prompts"], lambda i: (5, 17, 33, 9, 64, 12, 100, 3)[i % 8], 1000)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        hf.generation_config.eos_token_id = None         # moegen ignores EOS here too
        refs = [hf.generate(torch.tensor([p], device=device), max_new_tokens=n_new, do_sample=False,
                            pad_token_id=0)[0, len(p):].tolist() for p in ps]
        del hf
        model = load_model(path, "float32")
        budget = streamed_budget(model, mode, 1 / 3, max_batch=3, attn_micro_batch=2)
        e = engine(model, mode, budget, 64 << 20, max_batch=3, attn_micro_batch=2)
        outs = e.generate(ps, SamplingParams(max_new_tokens=n_new, ignore_eos=True))
        same = sum(o.token_ids == r for o, r in zip(outs, refs))
        streamed = e.streamer.stats.bytes_moved > 0 and len(e.streamer.resident) < len(e.streamer.groups)
        check.record(f"exact-{arch}", same == len(ps) and streamed,
                     f"{same}/{len(ps)} prompts token-identical to transformers ({n_new} tokens, float32); "
                     + streamed_stats(e), matches=same, prompts=len(ps), budget_bytes=budget)
        del e, model
        if mode == "cuda":
            torch.cuda.empty_cache()


@torch.inference_mode()
def step_quantized(check: Check, mode: str, sizes: dict, work: Path) -> None:
    """The device (streamed) against the CPU (resident), float32 compute over the same codes."""
    config = fixture_config("mixtral", sizes["preset"])
    ps = prompts(sizes["prompts"], lambda i: 8 + 7 * i, 1000)
    params = SamplingParams(max_new_tokens=sizes["new_tokens"], ignore_eos=True)
    for fmt in ("fp8", "int4"):
        ref = engine(dummy_model(config, "float32", quantize=fmt), "rehearse", None, 64 << 20).generate(ps, params)
        model = dummy_model(config, "float32", quantize=fmt)
        e = engine(model, mode, streamed_budget(model, mode, 1 / 3), 64 << 20)
        outs = e.generate(ps, params)
        same = sum(a.token_ids == b.token_ids for a, b in zip(outs, ref))
        check.record(f"quantized-{fmt}", same == len(ps) and e.streamer.stats.bytes_moved > 0,
                     f"{same}/{len(ps)} prompts token-identical to the CPU; " + streamed_stats(e), matches=same)


@torch.inference_mode()
def step_features(check: Check, mode: str, sizes: dict, work: Path) -> None:
    config = fixture_config("mixtral", sizes["preset"])
    model = lambda: dummy_model(config, "float32", seed=3)    # noqa: E731 - a fresh copy per engine
    dev = engine(model(), mode, streamed_budget(model(), mode, 1 / 3), 64 << 20)
    cpu = engine(model(), "rehearse", None, 64 << 20)
    shared = prompts(1, lambda i: 40, 1000)[0]
    ps = [shared + p[1:] for p in prompts(4, lambda i: 5 + i, 1000, seed=2)]
    greedy = SamplingParams(max_new_tokens=sizes["new_tokens"], ignore_eos=True)

    cached = dev.generate(ps, greedy)
    hit = dev.stats.prefix_hit_rate
    plain = engine(model(), mode, streamed_budget(model(), mode, 1 / 3), 64 << 20, prefix_caching=False)
    same = [a.token_ids for a in cached] == [b.token_ids for b in plain.generate(ps, greedy)]
    check.record("prefix-caching", same and hit > 0, f"tokens identical with and without it, prefix hit rate {hit:.2f}",
                 hit_rate=hit)

    lp = SamplingParams(max_new_tokens=sizes["new_tokens"], ignore_eos=True, logprobs=3, prompt_logprobs=2)
    a, b = dev.generate(ps, lp), cpu.generate(ps, lp)
    worst = max(abs(x[t] - y[t]) for ca, cb in zip(a, b) for ea, eb in zip(ca.logprobs + ca.prompt_logprobs[1:],
                                                                          cb.logprobs + cb.prompt_logprobs[1:])
                for x, y in [(ea, eb)] for t in x if t in y)
    tokens_same = [c.token_ids for c in a] == [c.token_ids for c in b]
    check.record("logprobs", tokens_same and worst <= LOGPROB_TOL,
                 f"max |device - cpu| = {worst:.2e} (limit {LOGPROB_TOL:g}), tokens identical: {tokens_same}",
                 max_abs_diff=worst)

    for arch in ("mixtral", "deepseek_v2"):      # GQA and MLA: the KV cache in device memory, attention there
        placed = Engine(dummy_model(fixture_config(arch, sizes["preset"]), "float32", seed=3), None,
                        EngineConfig(device=device_of(mode), kv_cache_bytes=64 << 20), planner=DeviceAttention(mode))
        host = engine(dummy_model(fixture_config(arch, sizes["preset"]), "float32", seed=3), mode, None, 64 << 20,
                      max_batch=8, attn_micro_batch=2)
        same = [o.token_ids for o in placed.generate(ps, greedy)] == [o.token_ids for o in host.generate(ps, greedy)]
        where = placed.cache.device
        check.record(f"device-attention-{arch}", same and where == placed.device,
                     f"KV cache on {where}: tokens identical to decode attention over the host KV cache: {same}")

    sp = SamplingParams(max_new_tokens=sizes["new_tokens"], ignore_eos=True, n=4, temperature=1.0, top_p=0.9, seed=7)
    first, again = dev.generate(ps[:2], sp), dev.generate(ps[:2], sp)
    samples = [[s.token_ids for s in c.samples] for c in first]
    distinct = min(len({tuple(s) for s in per}) for per in samples)
    repeat = samples == [[s.token_ids for s in c.samples] for c in again]
    check.record("n-samples", repeat and distinct > 1 and all(len(per) == 4 for per in samples),
                 f"4 samples per prompt, at least {distinct} distinct, seeded repeat identical: {repeat}")


class DeviceAttention:
    """A planner that puts the KV cache and decode attention on the engine's device (as the search
    does when they fit beside the weights), with fixed batch settings."""

    def __init__(self, mode: str):
        self.device = device_of(mode)

    def plan(self, model_config, job, overrides):
        from moegen.planner.plan import Plan
        return Plan(device=self.device, attention="device", max_batch=8, attn_micro_batch=2,
                    max_prefill_tokens=4096), None


def step_footprint(check: Check, mode: str, sizes: dict, work: Path, fmt: str) -> None:
    """Peak RSS from the engine's construction to the end of a run over weights + KV cache, less
    what the process held before the model (the interpreter, torch and, on CUDA, its context).
    The peak is reset once the model exists: making random weights has transients of its own."""
    if mode == "cuda":
        torch.zeros(1, device="cuda")
    base = _status_bytes("VmRSS")
    model = dummy_model(v2lite(sizes["fp_layers"], sizes["v2_experts"]), "bfloat16",
                        quantize=None if fmt == "bf16" else fmt)
    weights = sum(module_bytes(g) for g in group_weights(model.weights).values())
    _return_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")         # VmHWM := VmRSS
    e = engine(model, mode, streamed_budget(model, mode, 0.25), sizes["kv"])
    ps = prompts(sizes["fp_n"], lambda i: sizes["fp_prompt"], 100000)
    t0 = time.perf_counter()
    e.generate(ps, SamplingParams(max_new_tokens=sizes["fp_gen"], ignore_eos=True))
    wall = time.perf_counter() - t0
    kv = sum(t.numel() * t.element_size() for layer in e.cache.layers for t in layer)
    peak = _status_bytes("VmHWM")
    # the staged backend's buffers and its dequantization temporaries stand in for device memory:
    # not host memory on a GPU
    staged = 0
    if mode != "cuda":
        quantized = [math.prod(w.shape) for w in model.weights.values() if is_quantized(w)]
        staged = e.streamer.num_buffers * e.streamer.buffer_bytes + DEQUANT_TEMPORARIES * 4 * max(quantized, default=0)
    ratio = (peak - base - staged) / (weights + kv)
    check.record(f"footprint-{fmt}", ratio <= RSS_LIMIT,
                 f"peak RSS {peak / 2**30:.2f} GiB ({base / 2**30:.2f} before the model"
                 + (f", {staged / 2**30:.2f} staged device memory" if staged else "") + ") over weights "
                 f"{weights / 2**30:.2f} + KV {kv / 2**30:.2f} GiB = {ratio:.2f} (limit {RSS_LIMIT}); "
                 f"{sizes['fp_n'] * sizes['fp_gen'] / wall:.1f} tok/s; " + streamed_stats(e),
                 peak_rss_bytes=peak, base_rss_bytes=base, weights_bytes=weights, kv_bytes=kv, ratio=ratio)


def _return_freed_memory() -> None:
    """Hand the random weights' freed transients back to the OS before the peak is reset: glibc keeps
    freed heap memory in its arenas, so without this the reset peak counts 0-0.7 GiB of garbage
    (whether it does depends on where the allocator happened to place them: the check flaked)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: nothing held back this way
        pass


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_throughput(check: Check, mode: str, sizes: dict, work: Path, shape: str) -> None:
    from moegen.bench.systems import get_system
    from moegen.bench.workloads import PromptSet
    if shape == "mixtral":
        config, n = fixture_config("mixtral", "bench" if mode == "cuda" else "tiny"), sizes["mixtral_n"]
    else:
        config = v2lite(sizes["v2_layers"], sizes["v2_experts"])
        n = sizes["v2_n"]
    path = write_checkpoint(config, work, f"{shape}-{config.num_hidden_layers}", torch.bfloat16)
    model = load_model(path, "bfloat16")
    budget = sizes["v2_budget"] if shape == "v2lite" and sizes["v2_budget"] else streamed_budget(model, mode, 0.1, 2)
    weights = sum(module_bytes(g) for g in group_weights(model.weights).values())
    del model
    ps = prompts(n, lambda i: sizes["tp_prompt"], config.vocab_size)
    wl = PromptSet(f"synthetic:prompt={sizes['tp_prompt']},gen={sizes['tp_gen']},n={n}", ps, sizes["tp_gen"], True,
                   None, "synthetic")
    device, rows, failed = device_of(mode), {}, []
    moegen_opts = dict(max_batch=n, attn_micro_batch=min(n, 64), max_prefill_tokens=4096, kv_cache_memory=sizes["kv"])
    runs = {"moegen-streamed": ("moegen", dict(moegen_opts, device_memory=budget, num_buffers=2,
                                                streaming="auto" if mode == "cuda" else "staged")),
            "moegen-resident": ("moegen", dict(moegen_opts, streaming="resident" if mode == "cuda" else "auto")),
            "hf-generate": ("hf-generate", dict(batch_size=min(n, 64))),
            "hf-offload": ("hf-offload", dict(batch_size=min(n, 64), device_memory=budget))}
    for label, (system, options) in runs.items():
        sys_ = get_system(system)
        skip = sys_.skip_reason(str(path), device)
        if skip:
            rows[label] = {"skipped": skip}
            continue
        try:
            r = sys_.run(str(path), wl, "bfloat16", device, warmup=False, **options)
            rows[label] = {"e2e_tok_s": r.metrics.get("e2e_tokens_per_s"), "tokens": [t[:8] for t in r.token_ids[:2]],
                           "peak_rss_per_weights_kv": r.metrics.get("peak_rss_per_weights_kv_bytes")}
        except Exception as exc:     # noqa: BLE001 - one system's failure is a FAIL line, the others still run
            rows[label], failed = {"error": f"{type(exc).__name__}: {exc}"}, failed + [label]
    ran = {k: v["e2e_tok_s"] for k, v in rows.items() if v.get("e2e_tok_s")}
    same = rows.get("moegen-streamed", {}).get("tokens") == rows.get("moegen-resident", {}).get("tokens")
    summary = ", ".join(f"{k} {v:.1f}" for k, v in ran.items()) + " tok/s"
    skipped = [f"{k} ({v['skipped']})" for k, v in rows.items() if "skipped" in v]
    check.record(f"throughput-{shape}", not failed and same and "moegen-streamed" in ran and budget < weights,
                 f"{summary}; weights {weights / 2**30:.2f} GiB, device budget {budget / 2**30:.2f} GiB; "
                 f"streamed = resident tokens: {same}" + (f"; failed: {failed}" if failed else "")
                 + (f"; skipped: {'; '.join(skipped)}" if skipped else ""),
                 rows=rows, weights_bytes=weights, budget_bytes=budget, n=n)


@torch.inference_mode()
def step_disk(check: Check, mode: str, sizes: dict, work: Path) -> None:
    """disk -> host -> device: a checkpoint larger than what the host budget leaves for weights, its
    embeddings and a quarter of the rest on the device, half of the rest in host memory (the
    device's quarter among it), the others read from the files as they stream; tokens against the
    same engine with every weight in host memory."""
    from moegen.planner.policy import DISK_READERS
    arch = "mixtral"
    path = write_checkpoint(fixture_config(arch, sizes["preset"]), work, f"{arch}-{sizes['preset']}")
    model = load_model(path, "float32")
    sizes_ = {k: module_bytes(g) for k, g in group_weights(model.weights).items()}
    rest = sum(sizes_.values()) - sizes_["model"]
    device_budget = streamed_budget(model, mode, 1 / 4)
    ps = prompts(sizes["prompts"], lambda i: 6 + 5 * i, 1000)
    params = SamplingParams(max_new_tokens=sizes["new_tokens"], ignore_eos=True)
    ref = [o.token_ids for o in engine(model, mode, device_budget, 64 << 20).generate(ps, params)]
    del model
    streaming = "auto" if mode == "cuda" else "staged"
    opts = dict(FIXED, device=device_of(mode), dtype="float32", kv_cache_memory=64 << 20, streaming=streaming,
                device_memory=device_budget)
    from moegen.engine.memory import host_memory_bytes
    whole = Engine.from_pretrained(path, host_memory=host_memory_bytes() // 2, **opts).layout   # the runtime's share
    largest = max(v for k, v in sizes_.items() if k != "model")
    host = (whole.reserve_bytes + whole.activation_bytes + (64 << 20) + DISK_READERS * largest + sizes_["model"]
            + rest // 2)
    e = Engine.from_pretrained(path, host_memory=host, **opts)
    s = e.streamer
    in_files = {k for k, g in s.groups.items() if any(t.is_meta for w in g.values() for t in tensors_of(w))}
    in_host = set(s.groups) - s.resident - in_files
    t0 = time.perf_counter()
    out = [o.token_ids for o in e.generate(ps, params)]
    wall = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(out, ref))
    tiers = f"{len(s.resident)} modules on the device, {len(in_host)} in host memory, {len(in_files)} in the files"
    check.record("disk-to-device", same == len(ps) and e.layout.disk and s.disk_bytes_read > 0 and bool(in_host)
                 and bool(in_files), f"{same}/{len(ps)} prompts token-identical to the host-resident run; host budget "
                 f"{host / 2**20:.0f} MiB ({whole.reserve_bytes / 2**20:.0f} of it the runtime's), weights "
                 f"{(rest + sizes_['model']) / 2**20:.0f} MiB; {tiers}; "
                 f"{s.disk_bytes_read / 2**20:.1f} MiB read from the files in {wall:.1f} s",
                 matches=same, prompts=len(ps), host_budget_bytes=host, disk_bytes_read=s.disk_bytes_read)


STEPS = {"ops": step_ops, "exact": step_exact, "quantized": step_quantized, "features": step_features,
         "footprint": step_footprint, "throughput": step_throughput, "disk": step_disk}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=STEPS)
    ap.add_argument("variant", nargs="?", help="footprint: bf16|fp8; throughput: mixtral|v2lite")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moegen-gpu-check"), help="checkpoints written here")
    ap.add_argument("--rehearse", action="store_true", help="on the CPU, weights streamed by the staged backend")
    args = ap.parse_args()
    mode = "rehearse" if args.rehearse else "cuda"
    if mode == "cuda" and not torch.cuda.is_available():
        print(f"FAIL {args.step}: no CUDA device (use --rehearse on a machine without one)")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.step + (f"-{args.variant}" if args.variant else ""), mode)
    extra = (args.variant,) if args.variant else ()
    STEPS[args.step](check, mode, SIZES[mode], args.work / mode, *extra)
    return 0 if all(c["ok"] for c in check.result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
