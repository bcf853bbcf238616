"""The engine's policy, declared once: the engine's config, the planner's Plan and the fallback
agree; what stays resident; which settings a call runs with."""
from types import SimpleNamespace

from moegen.engine import EngineConfig
from moegen.planner import policy
from moegen.planner.plan import Plan


def test_engine_config_plan_and_fallback_share_the_defaults():
    cfg, plan = EngineConfig(), Plan()
    assert cfg.block_size == plan.block_size == policy.DEFAULT_BLOCK_SIZE
    # buffers are chosen at the engine's start: DEFAULT_NUM_BUFFERS, or the disk tier's disk_num_buffers
    assert cfg.num_buffers is None and plan.num_buffers == policy.DEFAULT_NUM_BUFFERS
    assert policy.FALLBACK_SETTINGS == {k: getattr(plan, k) for k in policy.PLANNED}
    assert all(getattr(cfg, k) is None for k in policy.PLANNED)          # planned per call unless fixed


def test_disk_tier_buffers_hold_a_layers_experts_within_a_share_of_host_memory():
    mib, gib = 1 << 20, 1 << 30
    assert policy.disk_num_buffers(128, 9 * mib, 16 * gib) == 128           # 1.1 GiB of 16
    assert policy.disk_num_buffers(128, 9 * mib, 2 * gib) == int(0.1 * 2 * gib) // (9 * mib)
    assert policy.disk_num_buffers(8, 300 * mib, gib) == policy.MIN_NUM_BUFFERS


def test_choose_resident_takes_dense_groups_first_and_skips_what_does_not_fit():
    sizes = {"model.layers.0.experts.0": 3, "model.layers.0": 5, "model.layers.1": 9, "model.layers.1.experts.0": 2,
             "model.layers.1.experts.1": 4}
    # dense 5 (5), dense 9 does not fit (14 > 10), expert 3 (8), expert 2 (10), expert 4 does not fit
    assert policy.choose_resident(sizes, sizes, 10) == {"model.layers.0", "model.layers.0.experts.0",
                                                         "model.layers.1.experts.0"}
    assert policy.choose_resident(sizes, sizes, 0) == set()


def test_call_plan_prefers_the_config_then_the_plan_then_the_fallback():
    plan = SimpleNamespace(max_batch=7, attn_micro_batch=3, max_prefill_tokens=99)
    used = policy.call_plan({"max_batch": 2}, plan, "prediction")
    assert used.settings == {"max_batch": 2, "attn_micro_batch": 3, "max_prefill_tokens": 99}
    assert used.plan is plan and used.prediction == "prediction"
    assert policy.call_plan({"max_batch": 2}).settings == {**policy.FALLBACK_SETTINGS, "max_batch": 2}


def test_default_budgets_are_the_policy_shares():
    assert policy.default_kv_cache_bytes(64 << 30) == 16 << 30
    assert policy.default_device_budget_bytes(10 << 30) == int(0.8 * (10 << 30))
