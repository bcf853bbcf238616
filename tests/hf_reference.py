"""transformers as the reference implementation for exactness tests."""
import json
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


@lru_cache(maxsize=8)
def hf_model(path: str, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.inference_mode()
def hf_logits(path, seq: list[int], dtype=torch.float32) -> torch.Tensor:
    return hf_model(str(path), dtype)(torch.tensor([seq])).logits[0].float()


@torch.inference_mode()
def hf_greedy(path, prompt: list[int], max_new_tokens: int, dtype=torch.float32) -> list[int]:
    """One prompt at a time, so padding plays no part in the reference."""
    out = hf_model(str(path), dtype).generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                                               do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def gsm8k_questions(gsm8k_dir: Path, n: int, split: str = "test") -> list[str]:
    with (Path(gsm8k_dir) / f"{split}.jsonl").open() as f:
        return [json.loads(next(f))["question"] for _ in range(n)]
