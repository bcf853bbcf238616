"""Workload specs: synthetic, GSM8K and datasets-backed prompts; answers; errors that name the fault."""
import json

import pytest

from moegen.errors import InputError
from moegen.bench.workloads import (DEFAULT_TEMPLATE, accuracy, final_number, gsm8k_answer, parse_workload,
                              predicted_number)


class CharTokenizer:
    """A stand-in with moegen's tokenizer interface: BOS then one id per character."""
    bos_token_id, eos_token_id, vocab_size = 1, 2, 300

    def encode(self, text):
        return [self.bos_token_id] + [3 + ord(c) % 290 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


TOK = CharTokenizer()


def test_synthetic_prompts_have_fixed_length_and_start_with_bos():
    wl = parse_workload("synthetic:prompt=16,gen=5,n=7", TOK)
    assert wl.num_prompts == 7 and wl.max_new_tokens == 5 and wl.ignore_eos and wl.answers is None
    assert all(len(p) == 16 and p[0] == TOK.bos_token_id for p in wl.prompts)
    assert all(3 <= t < TOK.vocab_size for p in wl.prompts for t in p[1:])
    assert parse_workload("synthetic:prompt=16,gen=5,n=7", TOK).prompts == wl.prompts      # seeded
    assert parse_workload("synthetic:prompt=16,gen=5,n=7,seed=1", TOK).prompts != wl.prompts
    assert wl.describe()["prompt_tokens"] == 7 * 16


def test_defaults_and_ignore_eos_switch():
    wl = parse_workload("synthetic:n=2,prompt=4", TOK, default_gen=11)
    assert wl.max_new_tokens == 11
    assert not parse_workload("synthetic:n=2,prompt=4,ignore_eos=0", TOK).ignore_eos


def test_gsm8k_default_path_prompts_and_answers(gsm8k_dir, monkeypatch):
    monkeypatch.setenv("MOEGEN_GSM8K_DIR", str(gsm8k_dir))
    wl = parse_workload("gsm8k,n=3,gen=9", TOK)
    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()[:3]]
    assert wl.prompts == [TOK.encode(DEFAULT_TEMPLATE.format(**r)) for r in rows]
    assert wl.answers == [r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in rows]
    assert wl.max_new_tokens == 9 and not wl.ignore_eos


def test_gsm8k_explicit_path_and_template(gsm8k_dir):
    wl = parse_workload(f"gsm8k:{gsm8k_dir / 'train.jsonl'},n=2,template=Q: {{question}}\\nA:", TOK)
    row = json.loads((gsm8k_dir / "train.jsonl").read_text().splitlines()[0])
    assert wl.prompts[0] == TOK.encode(f"Q: {row['question']}\nA:")
    assert parse_workload(f"gsm8k:{gsm8k_dir},split=train,n=2", TOK).answers == wl.answers


def test_hf_local_jsonl_through_datasets(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "hi, there", "gold": "The answer is 1,200."},
                                                      {"text": "bye", "gold": "-3"},
                                                      {"text": "third", "gold": "5"}]) + "\n")
    wl = parse_workload(f"hf:{path},field=text,answer=gold,n=2,gen=4", TOK)
    assert wl.prompts == [TOK.encode("hi, there"), TOK.encode("bye")]
    assert wl.answers == ["1200", "-3"] and wl.max_new_tokens == 4
    templated = parse_workload(f"hf:{path},template=<{{text}}|{{gold}}>", TOK)
    assert templated.prompts[1] == TOK.encode("<bye|-3>") and templated.answers is None


def test_hf_errors_name_the_fault(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(InputError, match=r"row 1: field 'text' is missing \(row has body\)"):
        parse_workload(f"hf:{path},field=text", TOK)
    with pytest.raises(InputError, match="row 1: template needs field 'text'"):
        parse_workload(f"hf:{path},template={{text}}", TOK)
    with pytest.raises(InputError, match="exactly one of field"):
        parse_workload(f"hf:{path}", TOK)
    with pytest.raises(InputError, match="does not exist"):
        parse_workload(f"hf:{tmp_path / 'nope.jsonl'},field=text", TOK)
    with pytest.raises(InputError, match="needs a dataset name"):
        parse_workload("hf:,field=text", TOK)


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("sharegpt:n=3", "unknown kind 'sharegpt'; known kinds: synthetic, gsm8k, hf"),
    ("synthetic:prompt=8,colour=red", "unknown key 'colour' for synthetic"),
    ("synthetic:prompt=eight", "prompt='eight' is not an integer"),
    ("synthetic:prompt=8,n", "'n' is not key=value"),
    ("synthetic:prompt=8,ignore_eos=maybe", "not a boolean"),
    ("synthetic:prompt=8,gen=0", "gen must be >= 1"),
    ("synthetic:prompt=0", "prompt must be >= 1"),
    ("gsm8k:/no/such/dir,n=2", "GSM8K file /no/such/dir does not exist"),
])
def test_bad_specs(spec, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        parse_workload(spec, TOK)


def test_answer_extraction_and_accuracy():
    assert gsm8k_answer("so 3 + 4 = 7\n#### 1,007") == "1007"
    with pytest.raises(InputError, match="no '#### N'"):
        gsm8k_answer("7")
    assert final_number("pay $18.00 today.") == "18" and final_number("none") is None
    assert final_number("-2.50") == "-2.5"
    # the text after the answer (a new question, a blank line) is not scored
    assert predicted_number(" 5 + 3 = 8 apples.\n\nQuestion: 12 pears?") == "8"
    assert accuracy([" It is 8.", " 3", " none"], ["8", "4", "1"]) == {"accuracy": 1 / 3, "correct": 1, "scored": 3}
