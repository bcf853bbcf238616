"""Planner cost model and search: hand-computed cases, the paper's Mixtral-on-a-24 GB-GPU shape,
the bench fixture on a CPU, memory errors, overrides, and the `moegen plan` command."""
import argparse
import json
import math

import pytest

from moegen.engine.llm_engine import EngineConfig
from moegen.errors import InputError
from moegen.engine.weight_stream import group_weights, module_bytes
from moegen.checkpoints.fixture import ARCHS, fixture_config
from moegen.loader import dummy_model
from moegen.planner.cost_model import JobShape, predict
from moegen.planner.hardware import GemmCurve, Hardware
from moegen.planner.memory import activation_bytes, model_group_bytes, resident_set
from moegen.planner.model_spec import ModelSpec
from moegen.cli.plan import add_subparser, parse_hw
from moegen.planner.plan import Plan, PlanError
from moegen.planner.policy import choose_resident
from moegen.planner.search import HOST_RESERVE_BYTES, predict_for_engine, search

GiB = 1 << 30
MiB = 1 << 20

# An A5000-class box (MoE-Gen's): 24 GB GPU at ~70 TFLOP/s achieved bf16, 768 GB/s, PCIe 4.0 x16
# at 25 GB/s, 128 GB host; CPU attention at 100 GB/s of KV (a many-channel server CPU).
A5000 = dict(device="cuda", gemm_flops_per_s={"bfloat16": 70e12}, device_mem_bw_gbps=768, h2d_gbps=25,
             d2h_gbps=25, host_mem_bw_gbps=100, cpu_attention_gbps=100, device_memory_bytes=24 * GiB,
             host_memory_bytes=128 * GiB)

# This 2-core machine's probe, as `probe("cpu")` returned it (a fixed copy keeps the test exact).
CPU_PROBE = {
    "device": "cpu", "hostname": "vm", "host_memory_bytes": 25276514304, "host_mem_bw_gbps": 28.6,
    "cpu_attention": {"kv_gbps": 6.73, "kv_bytes_per_s": 6.73e9},
    "gemm_best_flops_per_s": {"bfloat16": 839.7e9, "float32": 60.8e9, "float16": 0.78e9},
    "gemm": {"bfloat16": {"best_flops_per_s": 839.7e9, "shapes": [
        {"m": 64, "k": 1024, "n": 1024, "flops_per_s": 11.2e9, "calibration": True},
        {"m": 256, "k": 1024, "n": 3584, "flops_per_s": 839.7e9},
        {"m": 512, "k": 1024, "n": 3584, "flops_per_s": 230.3e9},
        {"m": 1024, "k": 1024, "n": 3584, "flops_per_s": 229.4e9},
        {"m": 64, "k": 4096, "n": 14336, "flops_per_s": 118.5e9},
        {"m": 2048, "k": 1024, "n": 3584, "flops_per_s": 236.2e9},
        {"m": 256, "k": 4096, "n": 14336, "flops_per_s": 274.4e9}]}},
}

# One layer, 4 experts top-1, hidden 64, 4 heads of 16 (no GQA), expert width 128, vocab 100.
TINY = {"model_type": "mixtral", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128, "num_local_experts": 4,
        "num_experts_per_tok": 1}
# Round rates and no dispatch overheads, so every term is a line of arithmetic.
UNIT_RATES = dict(gemm_flops_per_s={"bfloat16": 1e9}, host_mem_bw_gbps=1, cpu_attention_gbps=1,
                  op_overhead_s=0, seq_overhead_s=0)


@pytest.fixture(scope="module")
def mixtral():
    return ModelSpec.from_config("mixtral-8x7b")


@pytest.fixture(scope="module")
def bench():
    return ModelSpec.from_config(fixture_config("mixtral", "bench"))


# ---- hand-computed -----------------------------------------------------------------------------

def test_predict_tiny_cpu_by_hand():
    spec, hw = ModelSpec.from_config(TINY), Hardware(device="cpu", **UNIT_RATES)
    plan = Plan(device="cpu", max_batch=2, attn_micro_batch=2, max_prefill_tokens=8)
    pred = predict(spec, hw, plan, JobShape(prompt_len=4, gen_len=2, num_sequences=2))
    # Every GEMM here is compute-bound at 1 GFLOP/s (each matrix's FLOPs/rate beats its bytes/1 GB/s).
    # Decode step, T = 2 tokens at context 5 (each sequence's one decode step):
    #   dense: 2*T*(64*192 qkv + 64*64 o + 64*4 router) = 4 * 16640          = 66560 FLOP -> 66.560 us
    #   attention: 2 seqs * 5 keys * (K+V: 2*4*16 elems) * 2 B = 2560 B at 1 GB/s       ->  2.560 us
    #   experts: D = 4*(1-(3/4)^2) = 1.75 distinct, T*k/D rows each; FLOPs = 2*T*k*3*64*128
    #            = 2*2*24576 = 98304 FLOP (independent of D)                           -> 98.304 us
    #   lm_head: 2*2*64*100 = 25600 FLOP                                                -> 25.600 us
    #   sampling: 2 rows * 100 * 12 B = 2400 B                                          ->  2.400 us
    #   step = 66.56 + 2.56 + 98.304 + 25.6 + 2.4                                        = 195.424 us
    assert pred.decode_s == pytest.approx(195.424e-6, rel=1e-9)
    assert pred.decode_tokens_per_s == pytest.approx(2 / 195.424e-6, rel=1e-9)       # N*(gen-1) = 2 tokens
    # Prefill pass, T = 8 tokens (2 prompts of 4):
    #   dense 8*2*16640 = 266240 FLOP -> 266.24 us; attention core: per prompt 1+2+3+4 = 10 keys *
    #   2*4*(16+16) FLOP/key = 2560 FLOP, x2 prompts -> 5.12 us; experts 2*8*24576 -> 393.216 us;
    #   lm_head on the 2 last tokens 25.6 us; sampling 2.4 us               pass = 692.576 us
    assert pred.prefill_s == pytest.approx(692.576e-6, rel=1e-9)
    assert pred.e2e_tokens_per_s == pytest.approx(4 / (692.576e-6 + 195.424e-6), rel=1e-9)   # 4 generated
    assert pred.bound == "compute" and pred.terms_s["decode"]["pcie"] == 0


def test_cpu_elementwise_and_prompt_attention_terms_by_hand():
    """The same tiny run with the probe's elementwise bandwidth and prompt-attention rate set."""
    spec = ModelSpec.from_config(TINY)
    hw = Hardware(device="cpu", elementwise_gbps=1, prefill_attention_flops_per_s=1e8, **UNIT_RATES)
    plan = Plan(device="cpu", max_batch=2, attn_micro_batch=2, max_prefill_tokens=8)
    pred = predict(spec, hw, plan, JobShape(prompt_len=4, gen_len=2, num_sequences=2))
    # elements per token in the layer's non-GEMM passes (h=64, 8 heads x 16 of rope, k=1, I=128):
    #   norms 4h 256 + adds 6h 384 + rope 2*(4+4)*16 256 + kv write 2*128 256 + gather 2kh 128
    #   + activation 3kI 384 + weighting 2kh 128 + combine (k+1)h 128 = 1920 elems = 3840 B
    assert spec.elementwise_elems_per_token(0) == 1920
    # decode: T=2 -> 7680 B at 1 GB/s = 7.68 us on top of the 195.424 us above
    assert pred.decode_s == pytest.approx(203.104e-6, rel=1e-9)
    # prefill: T=8 -> 30.72 us; prompt attention's 5120 FLOP at 1e8 FLOP/s: 51.2 us instead of 5.12
    assert pred.prefill_s == pytest.approx((692.576 - 5.12 + 51.2 + 30.72) * 1e-6, rel=1e-9)
    assert pred.terms_s["decode"]["elementwise"] == pytest.approx(7.68e-6, rel=1e-9)


def test_from_probe_prefers_sustained_gemm_rates_and_reads_cpu_terms():
    probe = {**CPU_PROBE, "elementwise_gbps": 25.0, "cpu_prefill_attention": {"flops_per_s": 8e10},
             "gemm": {"bfloat16": {"best_flops_per_s": 1.0e12, "shapes": [
                 {"m": 256, "k": 1024, "n": 3584, "flops_per_s": 1.0e12, "sustained_flops_per_s": 0.9e12}]}}}
    hw = Hardware.from_probe(probe)
    assert hw.elementwise_gbps == 25.0 and hw.prefill_attention_flops_per_s == 8e10
    assert hw.gemm_rate("bfloat16", 256, 1024, 3584) == pytest.approx(0.9e12)


def test_predict_tiny_cuda_streaming_by_hand():
    spec = ModelSpec.from_config(TINY)
    hw = Hardware(device="cuda", h2d_gbps=1, device_mem_bw_gbps=1, sync_overhead_s=0, **UNIT_RATES)
    # resident: embedding + lm_head (2 * 100*64*2 B) + final norm 128 B + the layer's dense group
    # (attention 16384 + norms 128 + router 256 params) * 2 B = 25728 + 33536 = 59264 B; no expert fits
    plan = Plan(device="cuda", max_batch=2, attn_micro_batch=2, max_prefill_tokens=8, num_buffers=2,
                resident_bytes=59264)
    pred = predict(spec, hw, plan, JobShape(4, 2, 2))
    assert pred.resident_fraction == pytest.approx(59264 / spec.weight_bytes(2)["total"])
    # Decode step: before routing, dense 66.56 us + CPU attention 2.56 us + q/k/v out and o back over
    # PCIe: 2 tokens * (192 + 64) elems * 2 B = 1024 B -> 1.024 us.            pre = 70.144 us
    # Experts: 1.75 distinct, all streamed: 1.75 * 49152 B = 86.016 us of copies; compute 98.304 us,
    # 56.17 us per expert. Two buffers pipeline them: max(copies + one compute, one copy + computes)
    #   = max(86.016 + 56.174, 49.152 + 98.304) = 147.456 us
    # + lm_head 25.6 + sampling 2.4:          step = 70.144 + 147.456 + 28 = 245.6 us
    assert pred.decode_s == pytest.approx(245.6e-6, rel=1e-9)
    assert pred.terms_s["decode"]["pcie"] == pytest.approx(86.016e-6, rel=1e-9)
    # full overlap (HRM): max(PCIe 86.016 + 1.024, CPU 2.56, GPU 66.56 + 98.304) + 28 = 192.864 us
    assert pred.ideal_decode_tokens_per_s == pytest.approx(2 / 192.864e-6, rel=1e-9)


def test_gemm_curve_interpolates_in_rows():
    curve = GemmCurve(900e9, [(256, 1024, 3584, 800e9), (512, 1024, 3584, 200e9), (2048, 1024, 3584, 400e9),
                              (256, 4096, 14336, 300e9)])
    # the fast outlier at 256 rows is capped by the slower measurement at 512
    assert curve.rate(256, 1024, 3584) == pytest.approx(200e9)
    assert curve.rate(128, 1024, 3584) == pytest.approx(100e9)          # below: same time per call
    assert curve.rate(1024, 1024, 3584) == pytest.approx(math.sqrt(200e9 * 400e9))   # log-log midpoint
    assert curve.rate(8192, 1024, 3584) == pytest.approx(400e9)         # above: flat
    assert curve.rate(256, 14336, 4096) == pytest.approx(300e9)         # nearest shape group by K*N
    assert GemmCurve(1e12).rate(3, 10, 10) == 1e12
    assert GemmCurve(1e12, half_rate_tokens=64).rate(64, 10, 10) == pytest.approx(0.5e12)


def test_resident_set_matches_engine_choice(mixtral):
    groups, sizes = {"model": 0}, {"model": 524288000 + 8192}
    for i in range(mixtral.num_layers):
        groups[f"model.layers.{i}"] = 0
        layer = mixtral.layer_weight_bytes(i)
        sizes[f"model.layers.{i}"] = layer["total"] - layer["routed_experts"]
    for i in range(mixtral.num_layers):
        for e in range(mixtral.num_experts):
            key = f"model.layers.{i}.block_sparse_moe.experts.{e}"
            groups[key], sizes[key] = 0, mixtral.expert_bytes(2)
    for budget in (1 * GiB, 10 * GiB, 20 * GiB):
        engine = choose_resident(groups, sizes, budget) | {"model"}
        ours = resident_set(mixtral, budget, 2)
        assert sum(sizes[k] for k in engine) == ours.used_bytes
        assert sum(".experts." in k for k in engine) == sum(ours.experts)



@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "deepseek_v3"])   # v3 keeps its router bias in fp32
def test_resident_set_matches_engine_groups_of_a_built_model(arch):
    """The planner's weight groups are the engine's own (weight_stream's groups of a built model):
    the engine's choice keeps the bytes and experts the planner predicts, at every budget."""
    config = fixture_config(arch, "tiny")
    spec, model = ModelSpec.from_config(config), dummy_model(config, "bfloat16")
    sizes = {k: module_bytes(g) for k, g in group_weights(model.weights).items()}
    rest = {k: size for k, size in sizes.items() if k != "model"}
    assert sizes["model"] == model_group_bytes(spec, 2) and sum(sizes.values()) == spec.weight_bytes(2)["total"]
    for budget in range(sizes["model"], sum(sizes.values()) + 1, sum(rest.values()) // 40):
        engine = choose_resident(rest, sizes, budget - sizes["model"]) | {"model"}
        ours = resident_set(spec, budget, 2)
        assert sum(sizes[k] for k in engine) == ours.used_bytes
        assert sum(".experts." in k for k in engine) == sum(ours.experts)
        assert all((f"model.layers.{i}" in engine) == ours.dense[i] for i in range(spec.num_layers))

# ---- Mixtral-8x7B on a 24 GB GPU ---------------------------------------------------------------

def test_mixtral_24gb_streams_experts_keeps_kv_in_host(mixtral):
    hw = Hardware(**A5000)
    wl = JobShape(512, 256, 1024)
    plan, pred = search(mixtral, hw, wl, host_memory_bytes=128 * GiB, device_memory_bytes=24 * GiB)
    weights = mixtral.weight_bytes(2)["total"]
    assert plan.device == "cuda" and 0 < plan.resident_fraction < 0.3      # 87 GiB of weights, most streamed
    assert plan.resident_bytes + plan.pool_bytes + plan.activation_bytes <= 24 * GiB
    kv_seq = 768 * mixtral.kv_bytes_per_token(2)                            # 96 MiB per sequence
    assert plan.kv_cache_bytes >= plan.max_batch * kv_seq
    assert weights + plan.kv_cache_bytes <= 128 * GiB                       # the KV cache lives in host memory
    assert pred.decode_bound == "pcie" and pred.terms_s["decode"]["pcie"] > 0
    assert pred.e2e_tokens_per_s > 0
    opts = plan.to_engine_options()
    EngineConfig(**opts)                                                   # valid engine settings
    assert opts["device_memory"] < 24 * GiB and opts["kv_cache_bytes"] == plan.kv_cache_bytes


def test_mixtral_decode_grows_with_G_until_compute_bound(mixtral):
    hw = Hardware(**A5000)
    resident = 18 * GiB
    rates, bounds = [], []
    for G in [2 ** i for i in range(0, 17, 2)] + [65536]:
        plan = Plan(device="cuda", max_batch=G, attn_micro_batch=G, num_buffers=2, resident_bytes=resident)
        pred = predict(mixtral, hw, plan, JobShape(128, 128, G))
        rates.append(pred.decode_tokens_per_s)
        bounds.append(pred.decode_bound)
    assert all(b >= a * (1 - 1e-9) for a, b in zip(rates, rates[1:])), rates          # monotone
    assert bounds[0] == "pcie" and bounds[-1] == "compute", bounds
    first_compute = bounds.index("compute")
    assert set(bounds[:first_compute]) == {"pcie"} and set(bounds[first_compute:]) == {"compute"}, bounds
    assert rates[-1] / rates[-2] < 1.03                                                # flat once compute-bound
    assert rates[-1] / rates[0] > 100


# ---- the bench fixture on this CPU ---------------------------------------------------------------

def test_cpu_bench_plan_is_compute_bound(bench):
    hw = Hardware.from_probe(CPU_PROBE)
    plan, pred = search(bench, hw, JobShape(512, 256, 1024), host_memory_bytes=8 * GiB)
    assert plan.device == "cpu" and plan.resident_bytes is None and plan.attention == "cpu"
    assert pred.bound == "compute" and pred.decode_bound == "compute"
    assert pred.terms_s["decode"]["pcie"] == 0 and pred.terms_s["decode"]["kv"] == 0
    assert plan.max_batch >= 256                                  # small batches starve the expert GEMMs
    small = predict(bench, hw, Plan(device="cpu", max_batch=4, attn_micro_batch=4), JobShape(512, 256, 1024))
    assert small.e2e_tokens_per_s < pred.e2e_tokens_per_s / 10


def test_predict_for_engine_uses_its_settings(bench):
    hw = Hardware.from_probe(CPU_PROBE)
    wl = JobShape(128, 16, 64)
    kv_seq = 144 * bench.kv_bytes_per_token(2)                     # 144 tokens = 9 blocks of 16
    cfg = EngineConfig(max_batch=64, attn_micro_batch=0, kv_cache_bytes=10 * kv_seq)
    pred = predict_for_engine(bench, hw, cfg, wl)
    assert pred.batch == 10 and pred.waves == 7                   # the KV cache holds 10 sequences
    assert predict_for_engine(bench, hw, {"max_batch": 64, "kv_cache_bytes": GiB}, wl).batch == 64


# ---- memory errors, overrides --------------------------------------------------------------------

def test_infeasible_host_budget_names_host_and_shortfall(bench, mixtral):
    hw = Hardware.from_probe(CPU_PROBE)
    weights = bench.weight_bytes(2)["total"]
    prompt_act = activation_bytes(bench, 512, 1, 512, 2, prefill=True)   # one prompt's working set
    budget = weights + HOST_RESERVE_BYTES + prompt_act + 2 * MiB         # 2 MiB left for the KV cache
    with pytest.raises(PlanError, match=r"host memory: the KV cache for one sequence of 640 tokens needs "
                                        r"5\.0 MiB, 2\.0 MiB available \(budget .*; short by 3\.0 MiB"):
        search(bench, hw, JobShape(512, 128, 8), host_memory_bytes=budget)
    with pytest.raises(PlanError, match=r"host memory: the weights \(86\.99 GiB\).*the budget is 64\.00 GiB; short by"):
        search(mixtral, Hardware(**A5000), JobShape(512, 128, 8), host_memory_bytes=64 * GiB)


def test_infeasible_device_budget_names_device(mixtral):
    with pytest.raises(PlanError, match=r"device memory: .*streaming buffers.*need .*available.*short by"):
        search(mixtral, Hardware(**A5000), JobShape(512, 128, 8), device_memory_bytes=1 * GiB)


def test_overrides_are_honoured(mixtral):
    hw = Hardware(**A5000)
    wl = JobShape(512, 256, 1024)
    fixed = {"G": 64, "A": 16, "expert_chunk": 512, "num_buffers": 3, "max_prefill_tokens": 4096, "block_size": 32}
    plan, pred = search(mixtral, hw, wl, overrides=fixed)
    assert (plan.max_batch, plan.attn_micro_batch, plan.expert_chunk, plan.num_buffers, plan.max_prefill_tokens,
            plan.block_size) == (64, 16, 512, 3, 4096, 32)
    assert pred.batch == 64
    opts = plan.to_engine_options()
    assert (opts["max_batch"], opts["attn_micro_batch"], opts["block_size"]) == (64, 16, 32)
    plan, _ = search(mixtral, hw, wl, overrides={"resident_bytes": 10 * GiB})
    assert plan.resident_bytes <= 10 * GiB and plan.resident_bytes > 9 * GiB
    with pytest.raises(PlanError, match="host memory: the KV cache for 1024 sequences"):
        search(mixtral, hw, wl, overrides={"max_batch": 4096})
    with pytest.raises(InputError, match="not a plan choice"):
        search(mixtral, hw, wl, overrides={"batch": 4})
    with pytest.raises(InputError, match="attention must be one of cpu, device"):
        search(mixtral, hw, wl, overrides={"attention": "gpu"})


# ---- moegen plan ---------------------------------------------------------------------------------

def _plan_cli(argv):
    parser = argparse.ArgumentParser(prog="moegen")
    add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *argv])
    args.func(args)


def test_plan_cli_explicit_hardware(capsys, tmp_path):
    out_json = tmp_path / "plan.json"
    _plan_cli(["--model", "mixtral-8x7b", "--device", "cuda", "--host-memory", "128GB", "--device-memory", "24GB",
               "--hw", "tflops=70,h2d_gbps=25,device_mem_bw_gbps=768,host_mem_bw_gbps=100,cpu_attention_gbps=50",
               "--json", str(out_json)])
    out = capsys.readouterr().out
    for text in ("G (max_batch)", "resident weights", "end-to-end", "bound: pcie", "engine flags: --device cuda"):
        assert text in out
    saved = json.loads(out_json.read_text())
    assert saved["plan"]["max_batch"] == saved["engine_options"]["max_batch"] > 1


def test_plan_cli_prices_int8_experts_at_their_curve(capsys, tmp_path):
    """`moegen plan --experts-kernel int8` predicts with the probe's int8 curve (faster than the
    exact kernel's where it was measured faster); an unknown kernel is an InputError."""
    from moegen.planner.hardware import INT8_COMPUTE
    rows = [{"format": fmt, "rows_per_expert": r, "hidden": 1024, "intermediate": 448, "flops_per_s": rate}
            for fmt, rate in (("bfloat16", 4e11), (INT8_COMPUTE, 8e11)) for r in (64, 512)]
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"schema": 8, "device": "cpu", "gemm_best_flops_per_s": {"bfloat16": 4e11},
                                 "host_mem_bw_gbps": 40, "cpu_attention": {"kv_gbps": 20},
                                 "host_memory_bytes": 64 << 30, "fused_experts": {"isa": "amx", "shapes": rows}}))
    rates = {}
    for kernel in ("auto", "int8"):
        out = tmp_path / f"{kernel}.json"
        _plan_cli(["--model", str(fixture_dir_config("qwen3_moe", tmp_path)), "--probe-json", str(probe),
                   "--prompt-len", "128", "--gen-len", "64", "--num-seqs", "512", "--experts-kernel", kernel,
                   "--json", str(out)])
        rates[kernel] = json.loads(out.read_text())["prediction"]["e2e_tokens_per_s"]
    assert rates["int8"] > 1.2 * rates["auto"]
    with pytest.raises(InputError, match="experts_kernel"):
        _plan_cli(["--model", str(fixture_dir_config("qwen3_moe", tmp_path)), "--probe-json", str(probe),
                   "--experts-kernel", "int4"])


def fixture_dir_config(arch: str, tmp_path):
    """The bench preset's config.json of `arch`, written for `moegen plan --model`."""
    path = tmp_path / f"{arch}-config.json"
    path.write_text(json.dumps(fixture_config(arch, "bench").to_dict()))
    return path


def test_plan_cli_probe_json_and_errors(capsys, tmp_path):
    probe_file = tmp_path / "probe.json"
    probe_file.write_text(json.dumps(CPU_PROBE))
    _plan_cli(["--model", "mixtral-8x7b", "--probe-json", str(probe_file), "--host-memory", "160GB",
               "--prompt-len", "128", "--gen-len", "32", "--num-seqs", "64", "--max-batch", "32"])
    out = capsys.readouterr().out
    assert "probe vm/cpu" in out and "│ G (max_batch)        │ 32 " in out
    with pytest.raises(PlanError, match="host memory"):
        _plan_cli(["--model", "mixtral-8x7b", "--probe-json", str(probe_file), "--host-memory", "64GB"])
    with pytest.raises(InputError, match="--hw"):
        parse_hw("tflops")
    assert parse_hw("device_memory=24GB,tflops=2") == {"device_memory_bytes": 24 * GiB, "gemm_flops_per_s": 2e12}


def test_experts_multiplied_in_int8_cost_their_kernels_measured_rate():
    """experts_kernel=int8 (JobShape.experts_int8): the routed experts at the int8 kernel's curve
    (INT8_COMPUTE) and a byte a weight; without that curve measured, bf16's as before; the exact
    engine's prediction is unchanged by the int8 curve being there."""
    from dataclasses import replace
    from moegen.planner.hardware import INT8_COMPUTE
    spec = ModelSpec.from_config(fixture_config("qwen3_moe", "bench"))
    bf16 = ((64, 1024, 448, 4e11), (512, 1024, 448, 4e11))
    int8 = tuple((r, h, i, 2 * rate) for r, h, i, rate in bf16)
    hw = Hardware(gemm_flops_per_s=4e11, host_mem_bw_gbps=40, cpu_attention_gbps=20,
                  fused_experts_shapes={"bfloat16": bf16, INT8_COMPUTE: int8})
    only_bf16 = replace(hw, fused_experts_shapes={"bfloat16": bf16})
    plan = Plan(device="cpu", max_batch=512, attn_micro_batch=512, max_prefill_tokens=4096, expert_chunk=0)
    exact, lossy = JobShape(128, 64, 512), JobShape(128, 64, 512, experts_int8=True)
    base = predict(spec, hw, plan, exact)
    assert predict(spec, only_bf16, plan, exact).e2e_tokens_per_s == pytest.approx(base.e2e_tokens_per_s)
    assert predict(spec, only_bf16, plan, lossy).e2e_tokens_per_s == pytest.approx(base.e2e_tokens_per_s)
    fast = predict(spec, hw, plan, lossy)
    for phase in ("prefill", "decode"):
        saved = base.terms_s[phase]["compute"] - fast.terms_s[phase]["compute"]
        assert saved > 0.2 * base.terms_s[phase]["compute"]          # half the experts' share
    assert fast.e2e_tokens_per_s > 1.2 * base.e2e_tokens_per_s
    # few sequences (a few rows an expert): without the int8 curve every term is the exact engine's
    # (neither its rate nor its byte a weight assumed); with it, decode is cheaper
    small = Plan(device="cpu", max_batch=2, attn_micro_batch=2, max_prefill_tokens=4096, expert_chunk=0)
    few, few_int8 = JobShape(128, 64, 2), JobShape(128, 64, 2, experts_int8=True)
    assert predict(spec, only_bf16, small, few_int8).terms_s == predict(spec, only_bf16, small, few).terms_s
    assert predict(spec, hw, small, few_int8).decode_s < predict(spec, hw, small, few).decode_s
