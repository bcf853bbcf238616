"""moegen's model layer against transformers on fixture checkpoints of every architecture."""
import pytest
import torch

from moegen.checkpoints.fixture import ARCHS
from moegen.loader import load_model
from moegen.tokenizer import load_tokenizer
from tests.hf_reference import gsm8k_questions, hf_logits


@pytest.fixture(scope="module")
def prompts(gsm8k_dir):
    return gsm8k_questions(gsm8k_dir, 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_logits_match_transformers(arch, tiny_fixture, prompts):
    path = tiny_fixture(arch)
    tok = load_tokenizer(path)
    # ragged: four questions cut to four different lengths
    seqs = [tok.encode(q)[:n] for q, n in zip(prompts, (7, 19, 33, 12))]
    assert len({len(s) for s in seqs}) == 4
    ours = load_model(path, "float32").forward(seqs)
    for seq, logits in zip(seqs, ours):
        ref = hf_logits(path, seq)
        assert logits.shape == ref.shape
        assert (logits - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_padded_forward_equals_ragged(tiny_fixture):
    model = load_model(tiny_fixture("mixtral"), "float32")
    seqs = [[1, 5, 9, 200, 7], [1, 42, 3]]
    ids = torch.tensor([[1, 5, 9, 200, 7], [0, 0, 1, 42, 3]])   # second row left-padded
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    padded = model.forward_padded(ids, mask)
    ragged = model.forward(seqs)
    assert torch.allclose(padded[0], ragged[0])
    assert torch.allclose(padded[1, 2:], ragged[1])
    assert (padded[1, :2] == 0).all()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_fused_expert_checkpoint_loads_identically(arch, tiny_fixture, tiny_fused_fixture):
    per_expert = load_model(tiny_fixture(arch), "float32")
    fused = load_model(tiny_fused_fixture(arch), "float32")
    assert per_expert.weights.keys() == fused.weights.keys()
    for name, t in per_expert.weights.items():
        assert torch.equal(t, fused.weights[name]), name
    seq = [[1, 100, 200, 300, 400]]
    a, b = per_expert.forward(seq)[0], fused.forward(seq)[0]
    # same weights; only memory alignment differs, which can change SIMD rounding in the last bit
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_cast_to_requested_dtype(tiny_fixture, dtype):
    model = load_model(tiny_fixture("deepseek_v3"), dtype)
    for name, t in model.weights.items():
        # the DeepSeek routing bias stays float32, as in transformers
        assert t.dtype == (torch.float32 if name.endswith("e_score_correction_bias") else dtype), name


def test_parameter_count_matches_transformers(tiny_fixture):
    from tests.hf_reference import hf_model
    path = tiny_fixture("qwen2_moe")
    assert load_model(path).num_parameters() == sum(p.numel() for p in hf_model(str(path)).parameters())
