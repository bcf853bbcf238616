"""Each kind of bad checkpoint gets our exception type and a message naming the culprit."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moegen.errors import (CheckpointError, ConfigError, DTypeError, MissingTensorError, ShapeMismatchError,
                           UnexpectedTensorError, UnsupportedModelError)
from moegen.loader import load_model


@pytest.fixture
def ckpt(tiny_fixture, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_fixture("mixtral"), dst)
    return dst


def rewrite_tensors(ckpt, edit):
    files = sorted(ckpt.glob("*.safetensors"))
    assert len(files) == 1
    tensors = load_file(files[0])
    edit(tensors)
    save_file(tensors, files[0], metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope.*does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(ckpt)


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_model(ckpt)


def test_unsupported_model_type_lists_supported(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'llama' is not supported; supported: mixtral, qwen2_moe, "
                                                   "qwen3_moe, olmoe, deepseek_v2, deepseek_v3"):
        load_model(ckpt)


def test_missing_tensor_is_named(ckpt):
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(ckpt)


def test_missing_expert_tensor_is_named(ckpt):
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(MissingTensorError, match=r"experts\.2\.w3\.weight"):
        load_model(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    rewrite_tensors(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)))
    with pytest.raises(UnexpectedTensorError, match=r"model\.layers\.0\.self_attn\.extra\.weight"):
        load_model(ckpt)


def test_shape_mismatch_is_named(ckpt):
    def shrink(t):
        t["model.norm.weight"] = t["model.norm.weight"][:-1].clone()
    rewrite_tensors(ckpt, shrink)
    with pytest.raises(ShapeMismatchError, match=r"model\.norm\.weight has shape \(\d+,\), config implies"):
        load_model(ckpt)


def test_no_safetensors_files(ckpt):
    for f in ckpt.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_model(ckpt)


def test_index_naming_missing_shard(ckpt):
    f = next(ckpt.glob("*.safetensors"))
    names = list(load_file(f))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "gone.safetensors" for n in names}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        load_model(ckpt)


def test_unknown_dtype(ckpt):
    with pytest.raises(DTypeError, match="unknown dtype 'float8'"):
        load_model(ckpt, "float8")


@pytest.mark.parametrize("keep", [0.5, 0.001])       # cut in the data, and inside the header
def test_truncated_safetensors_is_named(ckpt, keep):
    f = sorted(ckpt.glob("*.safetensors"))[0]
    data = f.read_bytes()
    f.write_bytes(data[:max(8, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match=f.name):
        load_model(ckpt)


def test_nan_weight_is_named(ckpt):
    name = "model.layers.0.self_attn.q_proj.weight"
    rewrite_tensors(ckpt, lambda t: t[name].view(-1).__setitem__(3, float("nan")))
    with pytest.raises(CheckpointError, match=f"tensor {name} holds NaN"):
        load_model(ckpt)
