"""Hardware probe: a quick real measurement, the per-machine cache, and the attention fallback."""
import json
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from moegen.errors import MoegenError
from moegen.planner import probe as probe_mod
from moegen.planner import rates
from moegen.planner.probe import default_cache_path, format_probe, probe
from moegen.planner.rates import torch_paged_decode_attention


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "probe.json"
    return path, probe(quick=True, cache_path=path)


def test_quick_probe_measures_positive_rates(quick_cache):
    path, result = quick_cache
    assert result["cached"] is False and result["quick"] is True
    for key in ("hostname", "cpu_model", "torch_version", "torch_threads", "measured_at"):
        assert result[key]
    assert result["gemm_best_flops_per_s"]["float32"] > 0
    assert result["gemm_best_flops_per_s"]["bfloat16"] > 0
    assert result["host_mem_bw_gbps"] > 0
    assert result["cpu_attention"]["kv_bytes_per_s"] > 0
    assert result["cpu_prefill_attention"]["flops_per_s"] > 0 and result["elementwise_gbps"] > 0
    rows = [r for r in result["gemm"]["bfloat16"]["shapes"] if not r.get("calibration")]
    assert rows and all(0 < r["sustained_flops_per_s"] for r in rows)   # bf16: the engine's dtype
    assert result["probe_s"] > 0          # no bound: the first call may build moegen.ops' native kernel
    assert "h2d_pinned_gbps" not in result                       # CUDA-only keys stay out on the CPU


def test_second_call_reads_the_cache(quick_cache):
    path, first = quick_cache
    assert json.loads(path.read_text())["measured_at"] == first["measured_at"]
    t0 = time.perf_counter()
    again = probe(quick=True, cache_path=path)
    assert time.perf_counter() - t0 < 0.5
    assert again["cached"] is True and again["measured_at"] == first["measured_at"]
    assert again["gemm_best_flops_per_s"] == first["gemm_best_flops_per_s"]


def counting_measure(monkeypatch) -> list:
    calls = []

    def fake(device="cpu", quick=False):
        calls.append(quick)
        return {"schema": probe_mod.SCHEMA, "device": device, "torch_version": torch.__version__,
                "quick": quick, "measured_at": f"call {len(calls)}", "gemm": {},
                "gemm_best_flops_per_s": {"bfloat16": 1e12}, "host_mem_bw_gbps": 20.0,
                "cpu_attention": {"kv_gbps": 10.0}}
    monkeypatch.setattr(probe_mod, "measure", fake)
    return calls


def test_refresh_measures_again(tmp_path, monkeypatch):
    calls = counting_measure(monkeypatch)
    path = tmp_path / "p.json"
    probe(quick=True, cache_path=path)
    assert probe(quick=True, cache_path=path)["cached"] is True and len(calls) == 1
    fresh = probe(quick=True, cache_path=path, refresh=True)
    assert fresh["cached"] is False and len(calls) == 2
    assert json.loads(path.read_text())["measured_at"] == "call 2"


def test_stale_or_thinner_cache_is_not_reused(tmp_path, monkeypatch):
    calls = counting_measure(monkeypatch)
    path = tmp_path / "p.json"
    probe(quick=True, cache_path=path)
    assert probe(quick=False, cache_path=path)["cached"] is False          # quick does not stand for full
    assert probe(quick=True, cache_path=path)["cached"] is True            # full stands for quick
    path.write_text(path.read_text().replace(torch.__version__, "0.0.0"))
    assert probe(quick=True, cache_path=path)["cached"] is False           # another torch
    path.write_text("{not json")
    assert probe(quick=True, cache_path=path)["cached"] is False
    assert calls == [True, False, True, True]


@pytest.mark.parametrize("text", ["[]", "null", '"probe"', '{"schema": 3}',
                                  '{"schema": 3, "quick": true, "device": "cpu", "gemm_best_flops_per_s": null}',
                                  '{"schema": 3, "quick": "yes"}'])
def test_cache_of_the_wrong_shape_is_measured_again(tmp_path, monkeypatch, text):
    calls = counting_measure(monkeypatch)
    path = tmp_path / "p.json"
    path.write_text(text.replace('"cpu"', '"cpu", "torch_version": "%s"' % torch.__version__))
    result = probe(quick=True, cache_path=path)
    assert result["cached"] is False and calls == [True]
    assert probe(quick=True, cache_path=path)["cached"] is True            # the re-measured file is good


def test_default_cache_path_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_cache_path("cpu")
    assert path.parent == tmp_path / "moegen"
    assert path.name.startswith("probe-") and path.name.endswith("-cpu.json")


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MoegenError, match="cuda"):
        probe_mod.measure("cuda", quick=True)
    with pytest.raises(MoegenError, match="cuda:N"):
        probe_mod.measure("tpu", quick=True)


def test_format_probe_is_a_readable_table(quick_cache):
    text = format_probe(quick_cache[1])
    assert "GEMM bfloat16 best" in text and "host memory copy" in text and "GB/s" in text


@pytest.mark.parametrize("window", [0, 5])
def test_fallback_attention_matches_sdpa(window):
    torch.manual_seed(0)
    seqs, ctx, n_heads, n_kv, dim, block = 3, 11, 4, 2, 8, 4
    args = rates._attention_inputs(seqs, ctx, n_heads, n_kv, dim, block, torch.float32)
    q, k_cache, v_cache, tables, lens, scale = args
    out = torch_paged_decode_attention(*args, sliding_window=window)
    for s in range(seqs):
        k = k_cache[tables[s].long()].flatten(0, 1)[:ctx]
        v = v_cache[tables[s].long()].flatten(0, 1)[:ctx]
        if window:
            k, v = k[-window:], v[-window:]
        ref = F.scaled_dot_product_attention(q[s][:, None], k.transpose(0, 1), v.transpose(0, 1), scale=scale,
                                             enable_gqa=True)
        torch.testing.assert_close(out[s], ref[:, 0])


def test_attention_falls_back_when_the_engine_kernel_is_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "moegen.ops.attention", None)        # import now raises ImportError
    fn, impl = rates._decode_attention_impl()
    assert fn is torch_paged_decode_attention and "fallback" in impl
