"""Host and device memory of a streaming engine, checked on the CPU: resident weights leave host
memory, only streamed ones are pinned, weights + KV fit RAM, and the planner plans in the engine's
own device budget and buffer count."""
import logging

import pytest
import torch

from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.engine.weight_setup import WeightSetup
from moegen.engine.weight_stream import StagedBackend, WeightStreamer, group_weights, module_bytes, module_key
from moegen.errors import CapacityError
from moegen.checkpoints.fixture import fixture_config
from moegen.loader import dummy_model
from moegen.planner.cost_model import JobShape
from moegen.planner.hardware import Hardware
from moegen.planner.model_spec import ModelSpec
from moegen.planner.policy import DEVICE_RESERVE_BYTES, DEVICE_RESERVE_FRACTION, device_reserve_bytes
from moegen.planner.search import search

GiB = 1 << 30


class FakePinned:
    """Stands in for the pinned allocator: records what it hands out."""

    def __init__(self):
        self.slabs = []

    def __call__(self, nbytes):
        self.slabs.append(torch.empty(nbytes, dtype=torch.uint8))
        return self.slabs[-1]

    def owns(self, t: torch.Tensor) -> bool:
        ptr = t.data_ptr()
        return any(s.data_ptr() <= ptr < s.data_ptr() + s.numel() for s in self.slabs)


class MetaBackend(StagedBackend):
    """A device that is not host memory (meta tensors), so moving a weight there is visible."""
    device = torch.device("meta")


def test_resident_weights_leave_host_memory_and_only_streamed_ones_are_pinned():
    model = dummy_model(fixture_config("mixtral", "tiny"), "float32")
    weights = model.weights
    before = {n: w for n, w in weights.items()}
    resident = {"model", "model.layers.0", "model.layers.1.block_sparse_moe.experts.2"}
    pinned, released = FakePinned(), []
    streamer = WeightStreamer(weights, MetaBackend(pinned), resident, 2, release=released.append)
    for name, w in weights.items():
        if module_key(name) in resident:
            assert w.is_meta                          # on the device: no host copy kept
        else:
            assert pinned.owns(w) and torch.equal(w, before[name])
    resident_names = {n for n in weights if module_key(n) in resident}
    streamed_names = set(weights) - resident_names
    # every source was handed back once: resident ones after their device copy, streamed ones after pinning
    assert sorted(map(id, released)) == sorted(id(before[n]) for n in weights)
    pinned_bytes = sum(s.numel() for s in pinned.slabs)
    streamed_bytes = sum(module_bytes({n: weights[n]}) for n in streamed_names)
    assert streamed_bytes <= pinned_bytes < streamed_bytes + sum(module_bytes({n: weights[n]}) for n in resident_names)
    assert streamer.host_bytes == sum(module_bytes(g) for k, g in group_weights(weights).items() if k not in resident)


def test_kv_cache_is_pageable_and_exactly_sized(tiny_fixture):
    from moegen.loader import load_model
    engine = Engine(load_model(tiny_fixture("mixtral"), "float32"), None,
                    EngineConfig(streaming="staged", kv_cache_bytes=8 << 20))
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, ignore_eos=True))
    for layer in engine.cache.layers:
        for t in layer:
            assert not t.is_pinned()
            assert t.shape[0] == engine.blocks.num_blocks      # no rounding up


def _staged(model, **kw):
    return Engine(model, None, EngineConfig(streaming="staged", num_buffers=2, **kw))


def test_weights_and_kv_must_fit_ram(monkeypatch, caplog):
    import moegen.engine.weight_setup as weight_setup
    model = dummy_model(fixture_config("mixtral", "tiny"), "float32")
    held = sum(module_bytes(g) for k, g in group_weights(model.weights).items() if k != "model")
    ram = held + weight_setup.HOST_RESERVE_BYTES + (4 << 20)        # room for 4 MiB of KV cache
    monkeypatch.setattr(weight_setup, "host_memory_bytes", lambda: ram)
    with pytest.raises(CapacityError, match="host memory: the streamed weights"):
        _staged(model, kv_cache_bytes=8 << 20)
    with caplog.at_level(logging.WARNING, logger="moegen"):
        engine = _staged(model)                                   # the default share shrinks to what is left
    assert "shrunk" in caplog.text
    block = engine.config.block_size * engine.cache.layers[0][0][0, 0].numel() * 2 * 4 * len(model.layers)
    assert engine.max_blocks == (4 << 20) // block
    assert _staged(model, kv_cache_bytes=4 << 20).max_blocks == engine.max_blocks


class RecordingPlanner:
    def __init__(self):
        self.overrides = None

    def plan(self, model_config, job, overrides):
        from moegen.planner.plan import PlanError
        self.overrides = dict(overrides)
        raise PlanError("recorded only")


def test_planner_gets_the_engines_device_budget_buffers_and_resident_bytes():
    config = fixture_config("mixtral", "small")
    model = dummy_model(config, "bfloat16")
    sizes = {k: module_bytes(g) for k, g in group_weights(model.weights).items()}
    rest = sum(sizes.values()) - sizes["model"]
    budget = sizes["model"] + 3 * max(v for k, v in sizes.items() if k != "model") + rest // 2
    planner = RecordingPlanner()
    engine = Engine(model, None, EngineConfig(streaming="staged", num_buffers=3, device_memory=budget,
                                              kv_cache_bytes=64 << 20), planner=planner)
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=1, ignore_eos=True))
    s = engine.streamer
    assert {"model"} < s.resident < set(s.groups)                # some, not all, stay on the device
    assert s.resident_bytes + s.num_buffers * s.buffer_bytes <= budget
    ov = planner.overrides
    assert ov["device_memory_bytes"] == budget == engine.device_budget_bytes
    assert ov["num_buffers"] == 3 == s.num_buffers and ov["resident_bytes"] == s.resident_bytes

    # the search, given those on a CUDA machine, keeps them and fits its activations in what is left
    hw = Hardware(device="cuda", gemm_flops_per_s={"bfloat16": 1e12}, h2d_gbps=10, d2h_gbps=10,
                  device_mem_bw_gbps=100, host_mem_bw_gbps=10, cpu_attention_gbps=10, host_memory_bytes=16 * GiB)
    # a budget whose usable part (less the CUDA reserve) is the staged one plus room for activations
    device = int((ov.pop("device_memory_bytes") + DEVICE_RESERVE_BYTES + (64 << 20)) / (1 - DEVICE_RESERVE_FRACTION))
    plan, _ = search(ModelSpec.from_config(config), hw, JobShape(16, 8, 4), device_memory_bytes=device,
                     overrides=ov)
    assert plan.num_buffers == 3 and plan.resident_bytes == s.resident_bytes
    assert plan.resident_bytes + plan.pool_bytes + plan.activation_bytes <= device - device_reserve_bytes(device)


class OOMPlanner:
    def plan(self, model_config, job, overrides):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (the probe's GEMMs beside the weights)")


def test_a_probe_out_of_device_memory_falls_back_to_the_default_settings(tiny_fixture, caplog):
    from moegen.loader import load_model
    from moegen.planner.policy import FALLBACK_SETTINGS
    engine = Engine(load_model(tiny_fixture("mixtral"), "float32"), None, EngineConfig(kv_cache_bytes=8 << 20),
                    planner=OOMPlanner())
    with caplog.at_level(logging.WARNING, logger="moegen"):
        out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3 and "out of memory" in caplog.text
    assert dict(engine.stats.plan.settings) == FALLBACK_SETTINGS


def test_the_planner_probes_the_engines_own_gpu(monkeypatch, tmp_path):
    """An engine on cuda:1 plans from GPU 1's probe, not GPU 0's (built here without a GPU: the
    device check and the CUDA streamer are stubbed; only the planner's device is under test)."""
    import moegen.planner.measured as measured
    seen = []

    def fake_probe(device):
        seen.append(device)
        raise RuntimeError("probe stopped here")
    monkeypatch.setattr(measured, "probe", fake_probe)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("moegen.engine.llm_engine.check_machine", lambda cfg: None)
    monkeypatch.setattr(WeightSetup, "make_streamer", lambda self, layout: WeightStreamer(self.model.weights))
    engine = Engine(dummy_model(fixture_config("mixtral", "tiny"), "float32"), None,
                    EngineConfig(device="cuda:1", kv_cache_bytes=8 << 20))
    with pytest.raises(RuntimeError, match="probe stopped here"):
        engine.planner.hardware
    assert seen == ["cuda:1"]


# ---- decode attention on the device: a planner choice, with its cost ---------------------------

A5000 = dict(device="cuda", gemm_flops_per_s={"bfloat16": 70e12}, device_mem_bw_gbps=768, h2d_gbps=25,
             d2h_gbps=25, host_mem_bw_gbps=100, cpu_attention_gbps=20, device_memory_bytes=24 * GiB,
             host_memory_bytes=128 * GiB)


def test_decode_attention_goes_to_the_gpu_when_its_kv_cache_fits_beside_the_weights():
    small = ModelSpec.from_config(fixture_config("mixtral", "bench"))      # ~1.5 GB: resident with room to spare
    plan, pred = search(small, Hardware(**A5000), JobShape(128, 64, 256))
    assert plan.attention == "device" and plan.resident_fraction == 1.0
    kv = 256 * (128 + 64) * small.kv_bytes_per_token(2)
    assert plan.resident_bytes + plan.pool_bytes + plan.activation_bytes + kv <= 24 * GiB
    cpu_plan, cpu_pred = search(small, Hardware(**A5000), JobShape(128, 64, 256), overrides={"attention": "cpu"})
    assert cpu_plan.attention == "cpu"
    assert pred.decode_tokens_per_s > cpu_pred.decode_tokens_per_s            # no PCIe round trip, GPU bandwidth
    assert pred.terms_s["decode"]["kv"] == 0 < cpu_pred.terms_s["decode"]["kv"]


def test_decode_attention_stays_on_the_cpu_when_the_weights_fill_the_gpu():
    big = ModelSpec.from_config("mixtral-8x7b")                               # 87 GiB: streams
    plan, _ = search(big, Hardware(**A5000), JobShape(512, 256, 1024))
    assert plan.attention == "cpu"
    from moegen.planner.plan import PlanError
    with pytest.raises(PlanError):
        search(big, Hardware(**A5000), JobShape(512, 256, 1024), overrides={"attention": "device"})


def test_an_engine_puts_its_kv_cache_where_the_plan_says(tiny_fixture):
    """A plan with attention="device": the cache is allocated on the engine's device (here the CPU,
    so the placement path runs; the GPU kernels are tested in test_transfers), tokens unchanged."""
    from moegen.loader import load_model
    from moegen.planner.plan import Plan

    class DevicePlanner:
        def plan(self, model_config, job, overrides):
            return Plan(attention="device", max_batch=4, attn_micro_batch=2, max_prefill_tokens=64), None
    prompts = [[1, 4, 6], [1, 9, 9, 2]]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    ref = Engine(load_model(tiny_fixture("mixtral"), "float32"), None, EngineConfig(kv_cache_bytes=8 << 20),
                 planner=OOMPlanner()).generate(prompts, params)
    engine = Engine(load_model(tiny_fixture("mixtral"), "float32"), None, EngineConfig(kv_cache_bytes=8 << 20),
                    planner=DevicePlanner())
    assert [o.token_ids for o in engine.generate(prompts, params)] == [o.token_ids for o in ref]
    assert engine.stats.plan.plan.attention == "device" and engine.cache.device == engine.device
