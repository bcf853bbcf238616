"""The planner with the disk tier: a host budget below the model keeps what fits resident and
streams the rest from disk; the cost model charges the reads and says when they bound the plan."""
import argparse
from dataclasses import replace

import pytest

from moegen.cli.plan import add_subparser
from moegen.planner.cost_model import JobShape, predict
from moegen.planner.hardware import Hardware
from moegen.planner.model_spec import ModelSpec
from moegen.planner.plan import Plan, PlanError
from moegen.planner.search import search

GiB = 1 << 30
# a 2-core CPU at ~1 TFLOP/s bf16 and a ~2 GB/s disk (this machine's figures, rounded)
CPU = dict(device="cpu", gemm_flops_per_s={"bfloat16": 1e12}, host_mem_bw_gbps=20, cpu_attention_gbps=10,
           host_memory_bytes=24 * GiB)
JOB = JobShape(100, 64, 1024)


@pytest.fixture(scope="module")
def qwen3():
    return ModelSpec.from_config("qwen3-30b-a3b")        # 57 GiB in bf16


def test_without_the_disks_bandwidth_a_budget_below_the_model_is_refused(qwen3):
    with pytest.raises(PlanError, match="host memory"):
        search(qwen3, Hardware(**CPU), JOB, host_memory_bytes=16 * GiB)


def test_a_budget_below_the_model_streams_the_rest_from_disk(qwen3):
    plan, pred = search(qwen3, Hardware(**CPU, disk_read_gbps=2), JOB, host_memory_bytes=16 * GiB)
    total = qwen3.weight_bytes(2)["total"]
    assert plan.disk_tier and 0 < plan.resident_bytes < total and plan.pool_bytes > 0
    assert plan.host_memory_bytes <= 16 * GiB + (1 << 20)
    assert plan.resident_bytes + plan.pool_bytes + plan.kv_cache_bytes + plan.activation_bytes < 16 * GiB
    assert pred.terms_s["decode"]["disk"] > 0 and pred.decode_bound == "disk"
    # each decode step reads every streamed expert (1024 tokens x top-8 touch all 128 of a layer)
    streamed = (total - plan.resident_bytes) / 2e9
    assert pred.decode_step_s == pytest.approx(streamed, rel=0.35)


def test_a_faster_disk_is_worth_more_and_a_model_that_fits_reads_nothing(qwen3):
    hw = Hardware(**CPU, disk_read_gbps=2)
    _, slow = search(qwen3, hw, JOB, host_memory_bytes=16 * GiB)
    _, fast = search(qwen3, hw.replace(disk_read_gbps=8), JOB, host_memory_bytes=16 * GiB)
    assert fast.e2e_tokens_per_s > 1.5 * slow.e2e_tokens_per_s
    plan, pred = search(qwen3, hw, JOB, host_memory_bytes=120 * GiB)
    assert not plan.disk_tier and pred.terms_s["decode"]["disk"] == 0 == pred.terms_s["prefill"]["disk"]


def test_the_disk_read_overlaps_compute_through_the_pool(qwen3):
    """With two buffers or more the experts' reads overlap the experts' compute (attention and the
    router run before a layer's experts are known, so those do not overlap): less than the sum."""
    hw = Hardware(**CPU, disk_read_gbps=2)
    plan = Plan(device="cpu", max_batch=512, attn_micro_batch=512, num_buffers=3, resident_bytes=4 * GiB,
                kv_cache_bytes=8 * GiB)
    pred = predict(qwen3, hw, plan, JOB)
    disk, rest = pred.terms_s["decode"]["disk"], sum(v for k, v in pred.terms_s["decode"].items() if k != "disk")
    assert max(disk, rest) <= pred.decode_s < 0.95 * (disk + rest)


def test_plan_cli_shows_the_tier(capsys):
    parser = argparse.ArgumentParser(prog="moegen")
    add_subparser(parser.add_subparsers(dest="command"))
    hw = "tflops=1,host_mem_bw_gbps=20,cpu_attention_gbps=10,disk_read_gbps=2"
    args = parser.parse_args(["plan", "--model", "qwen3-30b-a3b", "--host-memory", "16GB", "--hw", hw,
                              "--prompt-len", "100", "--gen-len", "64"])
    args.func(args)
    out = capsys.readouterr().out
    for text in ("weight tier", "disk", "streaming buffers", "bound: disk", "--host-memory", "--kv-cache-memory"):
        assert text in out


# a GPU with less memory than the model, behind a host with less memory than the model
GPU = dict(device="cuda", gemm_flops_per_s={"bfloat16": 100e12}, device_mem_bw_gbps=1000, h2d_gbps=20,
           host_mem_bw_gbps=20, cpu_attention_gbps=10, host_memory_bytes=24 * GiB, device_memory_bytes=16 * GiB)


def test_behind_a_gpu_the_weights_neither_memory_holds_are_read_from_disk(qwen3):
    with pytest.raises(PlanError, match="host memory"):          # no disk bandwidth: the host must hold them
        search(qwen3, Hardware(**GPU), JOB, host_memory_bytes=16 * GiB)
    hw = Hardware(**GPU, disk_read_gbps=2)
    plan, pred = search(qwen3, hw, JOB, host_memory_bytes=16 * GiB)
    total = qwen3.weight_bytes(2)["total"]
    assert 0 < plan.resident_bytes < total and 0 < plan.host_resident_bytes < 16 * GiB
    assert pred.terms_s["decode"]["disk"] > 0
    # host memory holding more than the device: what lies between crosses PCIe, and reads less from disk
    roomy = predict(qwen3, hw, replace(plan, host_resident_bytes=40 * GiB), JOB)
    assert roomy.terms_s["decode"]["pcie"] > 0 and roomy.terms_s["decode"]["disk"] < pred.terms_s["decode"]["disk"]
    assert roomy.e2e_tokens_per_s > pred.e2e_tokens_per_s
    # a host that holds the model: nothing from disk
    plan, pred = search(qwen3, hw.replace(host_memory_bytes=120 * GiB), JOB, host_memory_bytes=120 * GiB)
    assert plan.host_resident_bytes is None and pred.terms_s["decode"]["disk"] == 0
