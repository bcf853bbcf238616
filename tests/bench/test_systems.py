"""Systems under test: each CPU system runs the same workload, and in float32 their greedy tokens
agree token for token; systems that cannot run here say why; metrics have one schema."""
import gc
import time

import pytest
import torch

from moegen import Engine, SamplingParams
from moegen.errors import InputError
from moegen.ops.build import native_ops
from moegen.bench.systems import SYSTEMS, get_system
from moegen.bench.systems.base import cut_after_eos
from moegen.engine.stats import lockstep_steps
from moegen.bench.systems.measure import MemoryMonitor
from moegen.bench.systems.peaks import Peaks, datasheet_peaks, hardware_peaks, probed_peaks
from moegen.bench.workloads import PromptSet

CPU_SYSTEMS = ["moegen", "moegen-model-batching", "hf-generate", "hf-continuous"]
# G, A and the prefill budget fixed, so the engine's planner does not probe the machine here
SMALL_KV = {"moegen": {"kv_cache_memory": "16MB", "max_batch": 8, "attn_micro_batch": 3, "max_prefill_tokens": 4096,
                       "repeat": 2},
            "moegen-model-batching": {"kv_cache_memory": "16MB", "batch_size": 2, "max_prefill_tokens": 4096}}
NEW_TOKENS = 6
PEAKS = Peaks(1e11, 20.0, "test")


@pytest.fixture(scope="module")
def model(tiny_fixture):
    return tiny_fixture("mixtral")


@pytest.fixture(scope="module")
def workload():
    """Ragged prompts (HF pads them; moegen does not), BOS first, fixed output length."""
    g = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(3, 32000, (n,), generator=g).tolist() for n in (4, 19, 9, 27, 13)]
    return PromptSet("ragged", prompts, NEW_TOKENS, True, None, "test:ragged")


@pytest.fixture(scope="module")
def results(model, workload):
    return {name: get_system(name).run(model, workload, dtype="float32", device="cpu", peaks=PEAKS,
                                       usd_per_hour=3.6, **SMALL_KV.get(name, {}))
            for name in CPU_SYSTEMS}


def test_cpu_systems_agree_token_for_token_in_float32(results, workload):
    reference = results["moegen"].token_ids
    assert len(reference) == workload.num_prompts
    assert all(len(ids) == NEW_TOKENS for ids in reference)
    for name in CPU_SYSTEMS:
        assert results[name].skipped_reason is None
        assert results[name].token_ids == reference, name
        assert results[name].texts == results["moegen"].texts, name


def test_metrics_share_one_schema(results, workload):
    keys = set(results["moegen"].metrics)
    for name, r in results.items():
        m = r.metrics
        assert {"prefill_tokens_per_s", "decode_tokens_per_s", "e2e_tokens_per_s", "wall_s", "peak_rss_bytes",
                "peak_device_bytes", "total_s_mfu", "decode_s_mbu", "usd_per_million_tokens", "accuracy",
                "load_s"} <= set(m), name
        assert {"prefill_tokens_per_s", "decode_tokens_per_s", "e2e_tokens_per_s", "wall_s"} <= keys & set(m)
        assert m["generated_tokens"] == NEW_TOKENS * workload.num_prompts
        assert m["prompt_tokens"] == workload.prompt_tokens
        assert m["e2e_tokens_per_s"] > 0 and m["wall_s"] > 0 and m["peak_rss_bytes"] > 0
        assert m["prefill_s"] + m["decode_s"] <= m["wall_s"] * 1.01, name
        assert 0 < m["total_s_mfu"] < 1 and m["decode_s_mbu"] > 0
        assert m["usd_per_million_tokens"] == pytest.approx(1e6 / 1000 / m["e2e_tokens_per_s"])
        assert m["accuracy"] is None and m["peak_device_bytes"] is None


def test_model_batching_uses_one_batch_size_for_every_module(results):
    settings = results["moegen-model-batching"].config["settings"]
    assert settings["max_batch"] == settings["attn_micro_batch"] == 2
    assert results["moegen"].config["settings"] == {"max_batch": 8, "attn_micro_batch": 3, "max_prefill_tokens": 4096}


@pytest.mark.skipif(native_ops() is None, reason="moegen's native kernels did not build on this machine")
def test_int8_system_runs_the_engine_with_int8_experts_beside_the_exact_one(model, workload):
    """`moegen-int8` is the moegen engine with experts_kernel=int8 and nothing else changed: a bf16
    run of both gives the same settings, and its tokens are its own engine's (lossy, so not the
    exact system's token for token)."""
    options = {"kv_cache_memory": "16MB", "max_batch": 8, "attn_micro_batch": 3, "max_prefill_tokens": 4096}
    exact, int8 = (get_system(name).run(model, workload, dtype="bfloat16", device="cpu", peaks=PEAKS, **options)
                   for name in ("moegen", "moegen-int8"))
    assert int8.skipped_reason is None and int8.config["settings"] == exact.config["settings"]
    assert [len(ids) for ids in int8.token_ids] == [NEW_TOKENS] * workload.num_prompts
    engine = Engine.from_pretrained(model, dtype="bfloat16", experts_kernel="int8", **options)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert [c.token_ids for c in engine.generate(workload.prompts, params)] == int8.token_ids
    with pytest.raises(InputError, match="experts_kernel"):
        get_system("moegen-int8").check_options({"experts_kernel": "torch"})


def test_hf_generate_sweeps_batch_sizes_and_keeps_the_best(model, workload, results):
    r = get_system("hf-generate").run(model, workload, dtype="float32", warmup=False, batch_sizes=[2, 64],
                                      sort_by_length=False)
    assert [s["batch_size"] for s in r.metrics["sweep"]] == [2, 5]        # 64 capped at the 5 prompts
    assert r.metrics["batch_size"] == max(r.metrics["sweep"], key=lambda s: s["e2e_tokens_per_s"])["batch_size"]
    assert r.token_ids == results["moegen"].token_ids


def test_repeats_report_the_median_pass(results):
    rates = results["moegen"].metrics["repeats_e2e_tokens_per_s"]
    assert len(rates) == 2 and results["moegen"].config["repeat"] == 2
    assert results["moegen"].metrics["e2e_tokens_per_s"] == pytest.approx(max(rates))   # median of 2 = upper
    # each phase's passes too: the nightly check takes the noise of every phase it watches from them
    from tasks.metrics import repeat_spreads
    for phase in ("prefill", "decode"):
        passes = results["moegen"].metrics[f"repeats_{phase}_tokens_per_s"]
        assert len(passes) == 2 and all(p > 0 for p in passes)
        assert results["moegen"].metrics[f"{phase}_tokens_per_s"] in passes   # the median pass's own
    spreads = repeat_spreads(results["moegen"].metrics)
    assert set(spreads) == {f"spread.{p}_tokens_per_s" for p in ("e2e", "prefill", "decode")}


@pytest.mark.parametrize("name, reason", [("hf-offload", "needs a CUDA device")])   # peers: test_peers.py
def test_gpu_only_systems_skip_with_a_reason_on_cpu(model, workload, name, reason):
    r = get_system(name).run(model, workload, dtype="float32", device="cpu")
    assert r.skipped_reason and reason in r.skipped_reason
    assert r.token_ids == [] and r.metrics == {}


def test_unknown_system_and_option_are_named():
    with pytest.raises(InputError, match="unknown system 'tgi'; known systems: " + ", ".join(SYSTEMS)):
        get_system("tgi")
    with pytest.raises(InputError, match="unknown option.*max_batch.*known: batch_size"):
        get_system("hf-generate").check_options({"max_batch": 4})


def test_eos_cut_and_lockstep_accounting():
    assert cut_after_eos([5, 2, 7], {2}, ignore_eos=False) == [5, 2]
    assert cut_after_eos([5, 2, 7], {2}, ignore_eos=True) == [5, 2, 7]
    assert lockstep_steps([3, 1, 2]) == [2, 1]          # first tokens come from prefill


def test_peaks_from_probe_or_datasheet():
    probe = {"gemm_best_flops_per_s": {"bfloat16": 2e11, "float32": 7e10}, "host_mem_bw_gbps": 30.0, "cached": True}
    assert probed_peaks(probe, "cpu", "bf16") == Peaks(2e11, 30.0, "probe (cached)")
    sheet = datasheet_peaks("cpu", "bfloat16")
    assert sheet.flops_per_s is None and sheet.source.startswith("none")
    assert hardware_peaks("cpu", "float32", "off")[1] is None
    with pytest.raises(InputError, match="probe mode"):
        hardware_peaks("cpu", "float32", "sometimes")


def test_memory_monitor_sees_an_allocation():
    gc.collect()        # earlier tests' garbage freed inside the window would hide part of the block
    with MemoryMonitor("cpu") as mon:
        block = torch.ones(256 << 20, dtype=torch.uint8)    # 256 MiB, touched
        time.sleep(0.2)                                      # the sampler reads every 20 ms
        del block
    assert mon.result()["peak_rss_delta_bytes"] >= 128 << 20
