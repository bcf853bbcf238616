"""Throughput metrics on cases computed by hand.

The tiny model (see tiny_spec): H=4, V=10, one MoE layer, GQA with 2 heads / 1 kv head of dim 2,
E=4 experts of width 3, top-2, no shared experts. Per token:
    attention projections  2 * (q 16 + k 8 + v 8 + o 16)      =  96 FLOPs
    router                 2 * 4 * 4                           =  32
    top-2 experts          2 experts * 2 * (3 * 4 * 3 = 36)    = 144
    lm_head                2 * 4 * 10                          =  80
    attention per key      2 * 2 heads * (2 q.k + 2 p.v)       =  16 per context token
so decode_flops(c) = 352 + 16 c and prefill_flops(P) = 272 P + 16 P(P+1)/2 + 80 (logits of the
last prompt token only). With 1-byte weights: non-expert bytes per pass = attention 48 + norms 12
+ router 16 + lm_head 40 = 116; one expert = 36 bytes; KV per token = K+V of 1 head of dim 2 = 4.

The run: prompts (3, 5), new tokens (3, 2). Prefill yields each sequence's first new token;
decode steps: step 1 runs both (contexts 4 and 6), step 2 runs the first (context 5).
"""
import math

import pytest

from moegen.engine.stats import RunRecord
from moegen.bench.metrics import (decode_tokens_per_s, e2e_tokens_per_s, prefill_tokens_per_s,
                                    run_bytes, run_flops, s_mbu, s_mfu, throughput_report, usd_per_million_tokens)
from moegen.planner.model_spec import GQASpec, ModelSpec, expected_distinct_experts

PREFILL_FLOPS = (3 * 272 + 16 * 6 + 80) + (5 * 272 + 16 * 15 + 80)      # 992 + 1680 = 2672
DECODE_FLOPS = (352 + 16 * 4) + (352 + 16 * 5) + (352 + 16 * 6)         # 416 + 432 + 448 = 1296


def tiny_spec(num_layers: int = 1) -> ModelSpec:
    return ModelSpec(model_type="mixtral", vocab_size=10, hidden_size=4, num_layers=num_layers,
                     attention=GQASpec(n_heads=2, n_kv_heads=1, head_dim=2), num_experts=4, top_k=2,
                     expert_intermediate=3, moe_layer_mask=(True,) * num_layers)


def tiny_run(**kw) -> RunRecord:
    fields = dict(prompt_lens=[3, 5], gen_lens=[3, 2], prefill_s=0.5, decode_s=2.0,
                  prefill_distinct_experts=4, decode_distinct_experts=5)
    return RunRecord(**{**fields, **kw})


def test_plain_rates_and_cost():
    assert prefill_tokens_per_s(800, 2.0) == 400
    assert decode_tokens_per_s(300, 0.0) == 0.0
    # 5 generated tokens over the whole 2.5 s, prefill included
    assert e2e_tokens_per_s(tiny_run().generated_tokens, tiny_run().total_s) == 2.0
    # $3.6/h at 1000 tok/s: $0.001 per second / 1000 tokens -> $1 per million
    assert usd_per_million_tokens(1000.0, 3.6) == pytest.approx(1.0)
    assert usd_per_million_tokens(0.0, 3.6) == math.inf


def test_record_derives_lockstep_steps_and_checks_sums():
    rec = tiny_run()
    assert rec.decode_tokens == 3 and rec.decode_steps() == (2, 1) and rec.prefill_passes() == (8,)
    assert rec.total_s == 2.5 and tiny_run(wall_s=2.2).total_s == 2.2
    with pytest.raises(ValueError, match="decode_step_seqs"):
        tiny_run(decode_step_seqs=[2, 2])
    with pytest.raises(ValueError, match="gen_lens"):
        RunRecord(prompt_lens=[1, 2], gen_lens=[1])


def test_flops_count_top_k_experts_per_token():
    spec, rec = tiny_spec(), tiny_run()
    assert run_flops(spec, rec, "prefill") == PREFILL_FLOPS == 2672
    assert run_flops(spec, rec, "decode") == DECODE_FLOPS == 1296
    assert run_flops(spec, rec) == 2672 + 1296
    # the same model routing to one expert (what MoE-CAP's code charged) does 72 FLOPs less per token
    one_expert = ModelSpec(**{**spec.__dict__, "top_k": 1})
    assert run_flops(spec, rec, "decode") - run_flops(one_expert, rec, "decode") == 3 * 72


def test_attention_counted_once_per_sequence_not_times_the_batch():
    spec = tiny_spec()
    one = run_flops(spec, RunRecord(prompt_lens=[6], gen_lens=[4]), "decode")
    # decode at contexts 7, 8, 9: 3 * 352 + 16 * 24
    assert one == 3 * 352 + 16 * 24
    batch = run_flops(spec, RunRecord(prompt_lens=[6] * 8, gen_lens=[4] * 8), "decode")
    assert batch == 8 * one                   # linear in the batch: no batch x batch attention term


def test_s_mfu_by_hand():
    spec, rec = tiny_spec(), tiny_run()
    # decode: 1296 FLOPs in 2 s on a 1296 FLOP/s peak -> 0.5
    assert s_mfu(spec, rec, peak_flops=1296, phase="decode") == pytest.approx(0.5)
    # prefill: 2672 FLOPs in 0.5 s = 5344 FLOP/s on a 10688 FLOP/s peak -> 0.5
    assert s_mfu(spec, rec, peak_flops=10688, phase="prefill") == pytest.approx(0.5)
    # total: 3968 FLOPs over 2.5 s on a 3968 FLOP/s peak
    assert s_mfu(spec, rec, peak_flops=3968) == pytest.approx(1 / 2.5)


def test_bytes_count_distinct_experts_once_per_layer():
    spec, rec = tiny_spec(), tiny_run()
    decode = run_bytes(spec, rec, "decode", dtype_bytes=1)
    assert decode["non_expert"] == 2 * 116            # two decode steps, each reads the dense weights once
    assert decode["embedding_rows"] == 3 * 4          # 3 decode tokens x one row of H=4
    assert decode["experts"] == 5 * 36                # 5 distinct (step, layer, expert) triples measured
    assert decode["kv_cache"] == (4 + 6 + 5) * 4      # contexts 4, 6 and 5, 4 bytes per cached token
    assert decode["total"] == 232 + 12 + 180 + 60 == 484
    # top-k per token would charge 3 tokens x 2 experts = 6 expert loads
    assert decode["experts"] < 3 * spec.top_k * 36
    prefill = run_bytes(spec, rec, "prefill", dtype_bytes=1)
    assert prefill == {"non_expert": 116, "embedding_rows": 8 * 4, "experts": 4 * 36, "kv_cache": 0,
                       "total": 116 + 32 + 144}


def test_s_mbu_by_hand():
    spec, rec = tiny_spec(), tiny_run()
    # 484 bytes in 2 s = 242 B/s against a 484 B/s (4.84e-7 GB/s) peak -> 0.5
    assert s_mbu(spec, rec, peak_bw_gbps=484e-9, phase="decode", dtype_bytes=1) == pytest.approx(0.5)
    # bf16 weights, 1-byte KV cache: every weight term doubles, the KV term stays
    bf16 = run_bytes(spec, rec, "decode", dtype_bytes=2, kv_dtype_bytes=1)["total"]
    assert bf16 == 2 * (232 + 12 + 180) + 60


def test_expected_distinct_experts_under_uniform_routing():
    assert expected_distinct_experts(4, 2, 1) == 2               # one token: exactly its top-k
    assert expected_distinct_experts(4, 2, 2) == 3               # 4 * (1 - (1/2)^2)
    assert expected_distinct_experts(8, 2, 10_000) == pytest.approx(8)
    assert expected_distinct_experts(8, 2, 0) == 0


def test_unmeasured_distinct_experts_use_the_uniform_estimate_per_layer():
    rec = tiny_run(decode_distinct_experts=None)
    # step 1 has 2 tokens -> 3 expected experts, step 2 has 1 token -> 2: the measured 5 again
    assert run_bytes(tiny_spec(), rec, "decode", dtype_bytes=1)["experts"] == 5 * 36
    # every MoE layer draws its own experts: two layers, twice the expert reads
    two = run_bytes(tiny_spec(num_layers=2), rec, "decode", dtype_bytes=1)
    assert two["experts"] == 2 * 5 * 36


def test_report_holds_every_metric():
    report = throughput_report(tiny_spec(), tiny_run(), peak_flops=3968, peak_bw_gbps=1.0, usd_per_hour=3.6)
    assert report["decode_flops"] == 1296 and report["e2e_tokens_per_s"] == 2.0
    assert report["total_s_mfu"] == pytest.approx(0.4)
    assert {"prefill_s_mbu", "decode_s_mbu", "total_s_mbu", "usd_per_million_tokens"} <= set(report)
    with pytest.raises(ValueError, match="phase"):
        s_mfu(tiny_spec(), tiny_run(), 1.0, phase="warmup")
