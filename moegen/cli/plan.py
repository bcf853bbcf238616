"""`moegen plan`: choose engine settings for a model, a machine and a workload, and say what
throughput to expect and what bounds it.

Hardware constants come from this machine's probe (cached), a probe JSON (`moegen probe --json`),
or explicit numbers (`--hw h2d_gbps=25,tflops=70,...`); `--hw` also overrides a probe's values.
"""
from __future__ import annotations

import argparse
import io
import json
from dataclasses import asdict
from pathlib import Path

from moegen.engine.memory import host_memory_bytes, parse_bytes
from moegen.engine.options import ENGINE_OPTIONS, FIELD_OF, add_arguments, config_of
from moegen.errors import InputError
from moegen.planner.cost_model import TERMS, JobShape, Prediction
from moegen.planner.hardware import Hardware
from moegen.planner.memory import format_bytes
from moegen.planner.model_spec import ModelSpec
from moegen.planner.plan import Plan
from moegen.planner.search import search

# the engine options the search chooses, which --max-batch etc. fix instead (flags from their declaration)
SEARCHED = ("max_batch", "attn_micro_batch", "max_prefill_tokens", "expert_chunk", "num_buffers", "block_size")
MEMORY_KEYS = {"device_memory_bytes", "host_memory_bytes"}
HW_ALIASES = {"tflops": "gemm_flops_per_s", "flops_per_s": "gemm_flops_per_s", "device_memory": "device_memory_bytes",
              "host_memory": "host_memory_bytes", "cpu_attn_gbps": "cpu_attention_gbps", "pcie_gbps": "h2d_gbps"}
BOUND_HINTS = {
    "pcie": "streaming weights host -> device: a larger G (host memory for KV) or more resident experts helps",
    "compute": "GEMM compute at the rate achieved for each GEMM's rows: a larger G helps only while more "
               "rows per expert still raise that rate",
    "memory": "reading weights from memory: too few tokens per expert GEMM; raise G",
    "attention": "decode attention over the host KV cache: bound by the CPU's memory bandwidth",
    "kv": "KV / activation traffic over PCIe",
    "disk": "reading streamed weights from disk: a larger G (--kv-cache-memory) spreads each read over more "
            "tokens; more --host-memory keeps more weights resident",
    "overhead": "per-op dispatch: too little work per op; raise G",
}


def parse_hw(text: str | None) -> dict:
    """"key=value,key=value" -> Hardware keyword arguments. Memory sizes accept units (24GB);
    `tflops` sets every dtype's GEMM peak in TFLOP/s."""
    out: dict = {}
    valid = sorted(set(Hardware.field_names()) | set(HW_ALIASES))
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        name = HW_ALIASES.get(key, key)
        if not sep or name not in Hardware.field_names():
            raise InputError(f"--hw: cannot read {item!r}; use key=value with keys: {', '.join(valid)}")
        try:
            if name in MEMORY_KEYS:
                out[name] = parse_bytes(value.strip())
            elif name == "device":
                out[name] = value.strip()
            else:
                number = float(value) * (1e12 if key == "tflops" else 1.0)
                out[name] = number
        except ValueError:
            raise InputError(f"--hw: {key}={value!r} is not a number") from None
    return out


def load_hardware(device: str | None, probe_json: str | None, hw_text: str | None) -> Hardware:
    overrides = parse_hw(hw_text)
    if probe_json:
        try:
            result = json.loads(Path(probe_json).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"--probe-json {probe_json}: cannot read ({exc})") from None
        return Hardware.from_probe(result, **overrides)
    if overrides:
        overrides.setdefault("device", device or "cpu")
        overrides.setdefault("host_memory_bytes", host_memory_bytes())
        return Hardware(**overrides, source="--hw")
    from moegen.planner.probe import probe
    return Hardware.from_probe(probe(device or "cpu"))


def add_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="choose G, A, buffers... from a measured cost model; predict throughput")
    p.add_argument("--model", required=True, help="checkpoint directory, config.json, or a bundled config name "
                   "(e.g. mixtral-8x7b)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: the probe's device, else cpu")
    p.add_argument("--host-memory", help="host memory moegen may use for weights, KV cache and activations, "
                   "e.g. 64GB (default: the hardware's); below the model's size (cpu, with the disk's bandwidth "
                   "from `moegen probe --disk`) the rest of the weights stream from disk")
    p.add_argument("--device-memory", help="GPU memory budget, e.g. 24GB (default: the hardware's)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--num-seqs", type=int, default=1024, help="sequences in the workload")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--probe-json", help="hardware constants from `moegen probe --json FILE` (--hw overrides them)")
    p.add_argument("--hw", help="explicit hardware numbers, key=value,...: tflops, h2d_gbps, d2h_gbps, "
                   "device_mem_bw_gbps, host_mem_bw_gbps, cpu_attention_gbps, device_memory, host_memory, ...")
    fix = p.add_argument_group("fix a choice instead of searching it")
    add_arguments(fix, [opt for opt in ENGINE_OPTIONS if opt.name in SEARCHED])
    # the engine's own option: int8 is priced at the int8 experts kernel's measured rate
    add_arguments(p, [opt for opt in ENGINE_OPTIONS if opt.name == "experts_kernel"])
    p.add_argument("--json", help="also write hardware, plan and prediction as JSON here")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args) -> None:
    hw = load_hardware(args.device, args.probe_json, args.hw)
    if hw.device == "cpu" and not hw.disk_read_gbps and Path(args.model).is_dir():   # a checkpoint: its disk
        from moegen.planner.disk_probe import disk_read
        try:
            hw = hw.replace(disk_read_gbps=disk_read(args.model)["gbps"])
        except InputError:        # files too small to measure with: plans keep every weight in memory
            pass
    spec = ModelSpec.from_config(args.model)
    kernel = config_of({"experts_kernel": args.experts_kernel or "auto"}).experts_kernel   # checked
    job = JobShape(args.prompt_len, args.gen_len, args.num_seqs, args.dtype, experts_int8=kernel == "int8")
    overrides = {name: getattr(args, name) for name in SEARCHED}
    if args.device:
        overrides["device"] = args.device
    plan, pred = search(spec, hw, job, parse_bytes(args.host_memory), parse_bytes(args.device_memory), overrides)
    print(format_plan(spec, hw, job, plan, pred), end="")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hw.to_dict(), "workload": asdict(job),
                                               "plan": plan.to_dict(), "engine_options": plan.to_engine_options(),
                                               "prediction": pred.summary()}, indent=1, default=str))


# ---- printing ---------------------------------------------------------------------------------

def _hw_line(hw: Hardware, dtype: str) -> str:
    top = hw.curve(dtype).top_flops_per_s
    rate = f"{top / 1e12:.1f} TFLOP/s" if top >= 1e12 else f"{top / 1e9:.1f} GFLOP/s"
    parts = [f"GEMM {dtype} up to {rate}",
             f"host memory {hw.host_mem_bw_gbps:.1f} GB/s", f"CPU attention {hw.cpu_attention_gbps:.1f} GB/s of KV"]
    if hw.device == "cuda":
        parts += [f"h2d {hw.h2d_gbps:.1f} GB/s", f"device memory {hw.device_mem_bw_gbps:.0f} GB/s"]
    if hw.disk_read_gbps:
        parts.append(f"disk {hw.disk_read_gbps:.2f} GB/s")
    return f"hardware ({hw.source}, {hw.device}): " + ", ".join(parts)


def engine_flags(plan: Plan) -> str:
    """The `moegen generate` flags that run this plan, spelled from the options' own declaration
    (moegen.engine.options: public name -> EngineConfig field), in this order."""
    opts = plan.to_engine_options()
    names = ["device", "max_batch", "attn_micro_batch", "max_prefill_tokens", "expert_chunk", "kv_cache_memory"]
    if opts["device"] == "cuda":
        names += ["num_buffers", "device_memory"]
    if plan.disk_tier:
        names += ["num_buffers", "host_memory"]
    return " ".join(f"--{name.replace('_', '-')} {opts[FIELD_OF[name]]}" for name in names)


def _plan_rows(spec: ModelSpec, wl: JobShape, plan: Plan) -> list[tuple[str, str, str]]:
    per_pass = max(1, plan.max_prefill_tokens // wl.prompt_len)
    kv_seq = plan.kv_cache_bytes // max(plan.max_batch, 1)
    rows = [("device", plan.device, ""),
            ("G (max_batch)", str(plan.max_batch), "sequences decoding together"),
            ("A (attn_micro_batch)", str(plan.attn_micro_batch), "sequences per attention micro-batch"),
            ("max_prefill_tokens", str(plan.max_prefill_tokens), f"{per_pass} prompts per prefill pass"),
            ("expert_chunk", str(plan.expert_chunk), "rows per expert GEMM (0 = all)"),
            ("decode attention", plan.attention, "over the KV cache in device memory" if plan.attention == "device"
             else "on the CPU over the host KV cache")]
    if plan.device == "cuda":
        rows += [("resident weights", format_bytes(plan.resident_bytes),
                  f"{plan.resident_fraction:.1%} of {format_bytes(spec.weight_bytes(wl.dtype_bytes)['total'])}"),
                 ("streaming buffers", str(plan.num_buffers), f"{format_bytes(plan.pool_bytes)} in all"),
                 ("device activations", format_bytes(plan.activation_bytes), "planner's estimate")]
        if plan.host_resident_bytes is not None:
            rows.append(("weight tier", "disk", f"host memory holds {format_bytes(plan.host_resident_bytes)} of the "
                         "weights (pinned); the streamed ones it does not hold are read from the checkpoint's files "
                         "each pass (disk -> host -> GPU)"))
    if plan.disk_tier:
        total = spec.weight_bytes(wl.dtype_bytes)["total"]
        rows += [("weight tier", "disk", f"host memory holds {format_bytes(plan.resident_bytes)} "
                  f"({plan.resident_fraction:.1%}) of {format_bytes(total)}; the rest is read from the checkpoint's "
                  "files each pass"),
                 ("streaming buffers", str(plan.num_buffers), f"{format_bytes(plan.pool_bytes)} in host memory"),
                 ("host memory", format_bytes(plan.host_memory_bytes), "--host-memory: weights, buffers, KV cache, "
                  "activations, runtime")]
    elif plan.device == "cpu":
        rows.append(("weight tier", "memory", "every weight in host memory"))
    rows += [(f"KV cache ({'device' if plan.attention == 'device' else 'host'})", format_bytes(plan.kv_cache_bytes),
              f"{format_bytes(kv_seq)} per sequence, "
              f"block_size {plan.block_size}")]
    return rows


def _prediction_rows(pred: Prediction) -> list[tuple[str, str, str]]:
    return [("end-to-end", f"{pred.e2e_tokens_per_s:,.1f} tok/s", f"generated tokens / {pred.total_s:,.1f} s"),
            ("prefill", f"{pred.prefill_tokens_per_s:,.1f} tok/s",
             f"{pred.prefill_passes} passes, {pred.prefill_layer_s * 1e3:,.2f} ms per layer; "
             f"{pred.prefill_bound}-bound"),
            ("decode", f"{pred.decode_tokens_per_s:,.1f} tok/s",
             f"{pred.decode_steps} steps, {pred.decode_layer_s * 1e3:,.2f} ms per layer; {pred.decode_bound}-bound"),
            ("decode, full overlap", f"{pred.ideal_decode_tokens_per_s:,.1f} tok/s",
             "HRM bound if every term overlapped")]


def format_plan(spec: ModelSpec, hw: Hardware, wl: JobShape, plan: Plan, pred: Prediction) -> str:
    from rich.console import Console
    from rich.table import Table

    out = io.StringIO()
    console = Console(file=out, width=120, color_system=None)
    params_b = spec.total_params() / 1e9
    console.print(f"moegen plan: {spec.name} ({params_b:.1f} B params, {wl.dtype}) | prompt {wl.prompt_len}, "
                  f"gen {wl.gen_len}, {wl.num_sequences} sequences")
    console.print(_hw_line(hw, wl.dtype))
    for title, rows in (("plan", _plan_rows(spec, wl, plan)), ("prediction", _prediction_rows(pred))):
        table = Table(title=title, title_justify="left")
        for column in ("", "value", "note"):
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    terms = Table(title="time by term (s, whole run)", title_justify="left")
    for column in ("term", "prefill", "decode"):
        terms.add_column(column, justify="right" if column != "term" else "left")
    for term in TERMS:
        terms.add_row(term, f"{pred.terms_s['prefill'][term]:,.2f}", f"{pred.terms_s['decode'][term]:,.2f}")
    console.print(terms)
    console.print(f"bound: {pred.bound} ({BOUND_HINTS[pred.bound]})")
    console.print(f"engine flags: {engine_flags(plan)}")
    return out.getvalue()
