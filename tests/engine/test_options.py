"""Engine options are declared once (EngineConfig's fields and DTYPE, moegen.engine.config): every
consumer (the CLI, the flows, the moegen systems, the lm-eval backend) offers each one by its
public name, and EngineConfig alone checks the values. A new field reaches them all, or these fail."""
import argparse
import inspect

import pytest

from moegen.engine.config import EngineConfig
from moegen.engine.options import ENGINE_OPTIONS, LOAD_OPTIONS, config_of, engine_option_names, parse_options
from moegen.errors import InputError

# a value of each option's kind other than its default, typed as the consumers hand it on
SAMPLE_BY_KIND = {"int": 3, "bytes": "8MB", "bool": False}
SAMPLES = {opt.name: SAMPLE_BY_KIND.get(opt.kind, opt.choices[-1] if opt.choices else None) for opt in ENGINE_OPTIONS}
SAMPLES["host_memory"] = "16MB"        # it holds the KV cache (kv_cache_memory, 8MB) and more
LOAD_NAMES = [opt.name for opt in LOAD_OPTIONS]


def as_flags(options: dict) -> "list[str]":
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            flags += [flag, str(value)]
    return flags


def parser_of(command_module):
    parser = argparse.ArgumentParser(prog="moegen")
    command_module.add_subparser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_every_field_is_an_option_and_the_samples_make_a_config():
    assert None not in SAMPLES.values(), "a new option kind needs a sample here"
    assert LOAD_NAMES == ["dtype", "device"]
    cfg = config_of(SAMPLES)
    assert cfg.kv_cache_bytes == 8 << 20 and cfg.max_batch == 3 and cfg.streaming == "staged"
    assert cfg.prepack is False


def test_generate_has_a_flag_for_every_option():
    from moegen.cli import generate
    args = parser_of(generate).parse_args(["generate", "--model", "m", "--input", "in.jsonl", "--out", "o",
                                           "--max-new-tokens", "1", "--device", "cuda:1", *as_flags(SAMPLES)])
    assert generate.engine_kwargs(args) == {"dtype": "bfloat16", "device": "cuda:1", **SAMPLES}
    bare = parser_of(generate).parse_args(["generate", "--model", "m", "--input", "i", "--out", "o",
                                           "--max-new-tokens", "1"])
    assert generate.engine_kwargs(bare) == {"dtype": "bfloat16", "device": "cpu"}   # unset: the engine's choice


def test_eval_and_bench_have_the_flags_of_the_options_they_take():
    from moegen.cli import bench, eval as eval_cli
    from moegen.engine.options import values_of
    args = parser_of(eval_cli).parse_args(["eval", "--model", "m", "--tasks", "t", "--dtype", "float32",
                                           *as_flags(SAMPLES)])
    assert values_of(args, ENGINE_OPTIONS) == SAMPLES and args.dtype == "float32" and args.device == "cpu"
    args = parser_of(bench).parse_args(["bench", "--model", "m", "--workload", "w", "--dtype", "float16",
                                        "--device", "cuda"])
    assert (args.dtype, args.device) == ("float16", "cuda")


def test_flows_take_every_option():
    from flows.bench import bench_flow
    from flows.eval import eval_flow
    from flows.generate import generate_flow
    from flows.params import EngineOptions
    assert EngineOptions(**SAMPLES).set_options() == SAMPLES
    assert EngineOptions().set_options() == {}
    for flow in (generate_flow, eval_flow, bench_flow):
        params = inspect.signature(flow.fn).parameters
        assert {*LOAD_NAMES, "engine"} <= set(params), flow.name


def test_moegen_systems_take_every_option():
    from moegen.bench.systems import get_system
    from moegen.bench.systems.base import System
    moegen = get_system("moegen")
    assert moegen.engine_overrides(moegen.check_options(SAMPLES)) == SAMPLES
    as_text = {name: str(value).lower() if isinstance(value, bool) else str(value)   # as a form sends them
               for name, value in SAMPLES.items()}
    assert moegen.engine_overrides(as_text) == SAMPLES
    batching = get_system("moegen-model-batching")
    fixed = {k: v for k, v in SAMPLES.items() if k not in ("max_batch", "attn_micro_batch")}
    assert batching.engine_overrides(batching.check_options(fixed)) == {**fixed, "max_batch": 32,
                                                                        "attn_micro_batch": 32}
    int8 = get_system("moegen-int8")
    others = {k: v for k, v in SAMPLES.items() if k != "experts_kernel"}
    assert int8.engine_overrides(int8.check_options(others)) == {**others, "experts_kernel": "int8"}
    assert set(LOAD_NAMES) <= set(inspect.signature(System.run).parameters)


def test_lm_eval_model_args_take_every_option(monkeypatch):
    from moegen.engine import Engine
    from moegen.eval import lm_eval_backend as lm_eval
    seen = {}
    monkeypatch.setattr(Engine, "from_pretrained", lambda path, **kw: seen.update(kw))
    lm_eval.model_args_recipe("ckpt", "float32", "cpu", dict(SAMPLES)).build()
    assert seen == {"device": "cpu", "dtype": "float32", **SAMPLES}
    assert set(LOAD_NAMES) <= set(inspect.signature(lm_eval.MoegenLM.__init__).parameters)


@pytest.mark.parametrize("given, message", [
    ({"max_batch": 0}, "max_batch must be >= 1, got 0"),
    ({"expert_chunk": -1}, "expert_chunk must be >= 0, got -1"),
    ({"max_batch": 2.5}, "max_batch must be an integer, got 2.5"),
    ({"block_size": None}, "block_size must be set"),
    ({"streaming": "gpu"}, "streaming must be auto, resident or staged, got 'gpu'"),
    ({"prepack": "yes"}, "prepack must be true or false"),
    ({"num_buffers": 1}, "num_buffers must be >= 2"),
    ({"kv_cache_bytes": "lots"}, "cannot read memory size 'lots'"),
])
def test_the_config_checks_every_value(given, message):
    with pytest.raises(InputError, match=message):
        EngineConfig(**given)


def test_consumers_report_the_configs_errors():
    from pydantic import ValidationError

    from flows.params import EngineOptions
    with pytest.raises(ValidationError, match="num_buffers must be >= 2"):
        EngineOptions(num_buffers=1)                # one check across options, the config's
    with pytest.raises(InputError, match="num_buffers must be >= 2"):
        config_of({"num_buffers": 1, "streaming": "auto"})
    assert config_of({"num_buffers": 1, "streaming": "resident"}).num_buffers == 1


def test_option_text_is_read_as_its_kind_and_unknown_names_are_named():
    assert parse_options({"max_batch": "8", "prepack": "false", "host_memory": "8GB", "expert_chunk": None}) == \
        {"max_batch": 8, "prepack": False, "host_memory": "8GB"}
    with pytest.raises(InputError, match="max_batch must be an integer, got 'many'"):
        parse_options({"max_batch": "many"})
    with pytest.raises(InputError, match="unknown engine option.*max_batchez; known: " + ", ".join(engine_option_names())):
        parse_options({"max_batchez": 1})
    assert EngineConfig(kv_cache_bytes="8GB", device_memory=512).kv_cache_bytes == 8 << 30
