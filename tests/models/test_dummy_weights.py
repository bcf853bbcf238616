"""Models from a config alone, with random weights made in memory."""
import json

import pytest
import torch

from moegen.engine import Engine, SamplingParams
from moegen.errors import ConfigError
from moegen.checkpoints.fixture import fixture_config
from moegen.loader import config_from, dummy_model
from moegen.loader import load_model


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_dummy_model_has_the_checkpoint_shapes(arch, tiny_fixture):
    real = load_model(tiny_fixture(arch), "float32")
    fake = dummy_model(tiny_fixture(arch) / "config.json", "bfloat16")
    assert {n: tuple(t.shape) for n, t in fake.weights.items()} == {n: tuple(t.shape) for n, t in real.weights.items()}
    assert (fake.weights["model.norm.weight"] == 1).all()
    assert fake.weights["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16


def test_engine_from_config_generates(tiny_fixture):
    cfg = json.loads((tiny_fixture("mixtral") / "config.json").read_text())
    engine = Engine.from_config(cfg, dtype="float32", kv_cache_memory="16MB")
    out = engine.generate([[1, 2, 3], [1, 5]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [3, 3]
    again = Engine.from_config(cfg, dtype="float32", kv_cache_memory="16MB").generate(
        [[1, 2, 3], [1, 5]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert [o.token_ids for o in out] == [o.token_ids for o in again]      # seeded weights


def test_bundled_config_names_resolve():
    cfg = config_from("mixtral-8x7b")
    assert cfg.model_type == "mixtral" and cfg.num_local_experts == 8 and cfg.hidden_size == 4096
    assert config_from(fixture_config("olmoe", "tiny")).model_type == "olmoe"


def test_unknown_config_name_lists_bundled():
    with pytest.raises(ConfigError, match="bundled: .*mixtral-8x7b"):
        config_from("no-such-model")
