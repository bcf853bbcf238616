"""Streaming schedule on the CPU staged backend: what is copied, in what order, into how many buffers."""
import torch

from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.engine.weight_stream import StagedBackend, WeightStreamer, group_weights
from moegen.loader import load_model


def tensor_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class RecordingEngine(Engine):
    """Records, per decode step, the modules copied and the experts that got tokens."""

    def step(self, phase, batch, sampler):
        stats = self.streamer.stats
        stats.reset()
        self.active = []
        orig = self.runner.feed_forward

        def spy(layer, w, h, *rest):
            if layer.is_moe:
                d = layer.ffn.dispatch(w, h)
                self.active += [layer.ffn.expert_key(e) for e in d.active_experts()]
            return orig(layer, w, h, *rest)
        self.runner.feed_forward = spy
        try:
            tokens = super().step(phase, batch, sampler)
        finally:
            self.runner.feed_forward = orig
        self.steps.append((phase, list(stats.copies), list(self.active), stats.bytes_moved, stats.max_buffers_in_use))
        return tokens


def run_staged(path, prompts, num_buffers=3, new_tokens=4):
    model = load_model(path, "float32")
    engine = RecordingEngine(model, None, EngineConfig(streaming="staged", num_buffers=num_buffers,
                                                       kv_cache_bytes=8 << 20))
    engine.steps = []
    out = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    return engine, out


def test_only_experts_with_tokens_are_copied_in_layer_order(tiny_fixture):
    engine, _ = run_staged(tiny_fixture("mixtral"), [[1, 10, 20]])   # one sequence: top-2 of 4 experts
    layers = [l.prefix for l in engine.model.layers]
    for phase, copies, active, _, _ in engine.steps:
        experts = [k for k in copies if ".experts." in k]
        assert experts == active                     # exactly the routed experts, in routing order
        assert [k for k in copies if ".experts." not in k] == layers
        if phase == "decode":
            assert len(experts) <= 2 * len(layers)   # a single token touches top_k experts per layer
            assert len(experts) < 4 * len(layers)    # ... so some experts moved no bytes at all


def test_bytes_per_step_match_accounting(tiny_fixture):
    engine, _ = run_staged(tiny_fixture("qwen2_moe"), [[1, 10, 20], [1, 5], [1, 7, 8, 9]])
    groups = group_weights(engine.model.weights)
    for _, copies, active, moved, _ in engine.steps:
        dense = [k for k in groups if k.startswith("model.layers.") and ".experts." not in k]
        predicted = sum(tensor_bytes(groups[k]) for k in dense + active)
        assert moved == predicted


def test_buffers_never_exceed_pool(tiny_fixture):
    for n in (2, 3, 5):
        engine, _ = run_staged(tiny_fixture("deepseek_v3"), [[1, 2, 3, 4]] * 3, num_buffers=n)
        assert max(step[4] for step in engine.steps) <= n
        assert engine.streamer.num_buffers == n


def test_staged_tokens_equal_resident_tokens(tiny_fixture):
    path = tiny_fixture("olmoe")
    prompts = [[1, 22, 33, 44], [1, 9], [1, 4, 5, 6, 7, 8]]
    _, staged = run_staged(path, prompts, num_buffers=2, new_tokens=8)
    resident = Engine(load_model(path, "float32"), None, EngineConfig(kv_cache_bytes=8 << 20)).generate(
        prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in staged] == [o.token_ids for o in resident]


def test_pool_buffers_are_reused_not_reallocated():
    weights = {f"model.layers.0.mlp.experts.{e}.gate_up": torch.full((4, 2), float(e)) for e in range(6)}
    weights["model.layers.0.input_layernorm.weight"] = torch.ones(2)
    streamer = WeightStreamer(weights, StagedBackend(), num_buffers=2)
    pool = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in streamer.free]
    keys = [f"model.layers.0.mlp.experts.{e}" for e in range(6)]
    streamer.plan(keys)
    for e, key in enumerate(keys):
        with streamer.module(key) as w:
            view = w[f"{key}.gate_up"]
            assert (view == e).all()
            assert any(lo <= view.data_ptr() < hi for lo, hi in pool)   # a view into a pool buffer
    assert sorted(b.data_ptr() for b in streamer.free) == sorted(lo for lo, _ in pool)
    assert streamer.stats.copies == keys
    assert streamer.stats.max_buffers_in_use == 2


def test_experts_are_prefetched_before_routing_when_nearly_all_will_be_active(tiny_fixture):
    """A prefill of 40 tokens over 4 experts, top-2, leaves an expert idle with probability 0.5^40:
    each layer's experts are queued with its dense weights, in expert order, before its routing;
    a single decode token (half the experts idle) only copies what it routes to. Same tokens."""
    prompts = [[1] + list(range(3, 42))]
    engine, out = run_staged(tiny_fixture("mixtral"), prompts, num_buffers=3)
    plain, ref = run_staged(tiny_fixture("mixtral"), prompts, num_buffers=3)
    assert out[0].token_ids == ref[0].token_ids
    layers = [l.prefix for l in engine.model.layers]
    phase, copies, active, _, used = engine.steps[0]
    assert phase == "prefill" and used <= 3
    for layer in layers:
        at = copies.index(layer)
        assert copies[at + 1:at + 5] == [f"{layer}.block_sparse_moe.experts.{e}" for e in range(4)]
    for phase, copies, active, _, _ in engine.steps[1:]:
        assert [k for k in copies if ".experts." in k] == active     # decode: only the routed experts


def test_a_cancelled_prefetch_frees_its_buffer():
    weights = {f"model.layers.0.mlp.experts.{e}.w": torch.full((8,), float(e)) for e in range(3)}
    weights["model.embed_tokens.weight"] = torch.zeros(4)
    s = WeightStreamer(weights, StagedBackend(), resident={"model"}, num_buffers=2)
    keys = [f"model.layers.0.mlp.experts.{e}" for e in range(3)]
    s.plan(keys)                                   # two loaded, the third queued
    assert set(s.loaded) == set(keys[:2]) and list(s.upcoming) == keys[2:]
    s.cancel([keys[0], keys[2]])                   # a loaded and a queued one got no token
    assert set(s.loaded) == {keys[1]} and not s.upcoming and len(s.free) == 1
    with s.module(keys[1]) as w:
        assert torch.equal(w[f"{keys[1]}.w"], torch.full((8,), 1.0))
    assert len(s.free) == 2
