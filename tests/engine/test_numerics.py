"""NaN or Inf in the logits is an error naming the requests and the position, not token 0."""
import pytest
import torch

from moegen.engine import Engine, SamplingParams
from moegen.engine.sampler import Sampler
from moegen.engine.scheduler import Sequence
from moegen.errors import NumericsError
from moegen.loader import load_model


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_sampler_refuses_non_finite_logits(bad):
    logits = torch.zeros(3, 10, dtype=torch.bfloat16)
    logits[1, 4] = bad
    if bad == float("-inf"):
        logits[1] = bad                        # a row with no finite logit at all
    seqs = [Sequence(i, [1, 2], SamplingParams()) for i in range(3)]
    with pytest.raises(NumericsError, match="request 1 at new token 0"):
        Sampler().sample(logits, seqs)


def test_finite_logits_pass():
    logits = torch.randn(2, 10)
    seqs = [Sequence(i, [1], SamplingParams()) for i in range(2)]
    assert Sampler().sample(logits, seqs) == logits.argmax(-1).tolist()


def test_engine_reports_nan_weights_in_flight(tiny_fixture):
    model = load_model(tiny_fixture("mixtral"), "float32")
    model.weights["model.norm.weight"][0] = float("nan")     # after the loader's check: as a bad kernel would
    engine = Engine(model, None, kv_cache_bytes=16 << 20)
    with pytest.raises(NumericsError, match="NaN or Inf"):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))
