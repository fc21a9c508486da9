"""The memory planner: estimates against XLA's memory analysis, refusals, bad input, CLI.

The estimates are checked against compilation only: `Plan.temp_bytes` against the temporaries
XLA assigns to the jitted SFT step (`compiled.memory_analysis().temp_size_in_bytes`).
"""

import json
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpost
from jaxpost import data, models, plan, plan_program, sharding, train

REPO = Path(__file__).resolve().parents[1]
TINY = models.get_config("tiny", vocab_size=64)


def _compiled_memory(config, mesh_shape, batch, seq_len):
    """XLA's memory analysis of the jitted SFT step from abstract inputs, per device, built as
    the loops build it (`jaxpost.plan_program`; on a mesh traced under `jax.set_mesh`, which
    turns on the model's batch-split activation constraints)."""
    mesh = None
    if tuple(mesh_shape) != (1, 1, 1):
        mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    return plan_program.compiled_memory(config, mesh, objective="sft", rows=batch,
                                        seq_len=seq_len)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_shape, batch, seq_len, remat, dtype",
    [
        *[((2, 2, 2), 8, 64, r, "float32") for r in ("none", "full", "dots", "attn")],
        *[((1, 8, 1), 16, 64, r, "float32") for r in ("none", "full", "dots", "attn")],
        ((1, 8, 1), 16, 64, "none", "bfloat16"),  # bf16 compute, f32 master weights
    ],
)
def test_estimate_matches_compiled_memory_analysis(mesh_shape, batch, seq_len, remat, dtype):
    config = TINY.replace(dtype=dtype, remat=remat)
    p = plan.plan(config, mesh_shape, batch=batch, seq_len=seq_len, platform="cpu")
    m = _compiled_memory(config, mesh_shape, batch, seq_len)
    # Activations are most of these plans, so the activation model is what is tested.
    assert p.terms["activations"] + p.terms["backward_peak"] >= 0.5 * p.temp_bytes
    assert abs(p.temp_bytes - m.temp_size_in_bytes) <= 0.2 * m.temp_size_in_bytes, p.table()
    # The whole step too: arguments + outputs that do not alias a donated argument + temps.
    compiled = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes)  # fmt: skip
    assert abs(p.train_step_bytes - compiled) <= 0.2 * compiled, p.table()


@pytest.mark.slow
def test_scanned_remat_keeps_only_the_block_input_per_layer():
    """Issue 18's property, at a tiny shape: under the scan, each layer adds to the compiled
    step's temporaries a quarter or less with remat="full" of what it adds without remat (an
    unrolled loop lets XLA:CPU undo the rematerialization), and the planner's per-layer terms
    follow."""
    kw = dict(batch=4, seq_len=128)
    temp, planned = {}, {}
    for n in (2, 4):
        for r in ("none", "full"):
            config = TINY.replace(n_layers=n, remat=r)
            temp[n, r] = _compiled_memory(config, (1, 1, 1), **kw).temp_size_in_bytes
            planned[n, r] = plan.plan(config, (1, 1, 1), platform="cpu", **kw).temp_bytes
            # One device: the planner's whole estimate too.
            assert abs(planned[n, r] - temp[n, r]) <= 0.2 * temp[n, r], (n, r)
    increment = {r: (temp[4, r] - temp[2, r]) / 2 for r in ("none", "full")}
    assert increment["full"] <= 0.25 * increment["none"], increment
    for r in ("none", "full"):
        planned_increment = (planned[4, r] - planned[2, r]) / 2
        assert abs(planned_increment - increment[r]) <= 0.2 * increment[r], r


def test_param_and_optimizer_terms_are_exact_shard_bytes():
    p = plan.plan(TINY, (1, 1, 1), batch=1, seq_len=4)
    assert p.terms["params"] == TINY.num_params() * 4
    # AdamW: two float32 moments (plus a few scalar counters).
    assert 2 * TINY.num_params() * 4 <= p.terms["optimizer"] <= 2 * TINY.num_params() * 4 + 64
    # FSDP 8 splits every weight's embed dim (64 / 8); tensor 1 leaves the rest whole.
    sharded = plan.plan(TINY, (1, 8, 1), batch=8, seq_len=4)
    assert sharded.terms["params"] < p.terms["params"] / 4


def test_fsdp_gathered_weights_term():
    """Every fsdp-split weight gathered (tensor split kept): the non-block weights plus one
    block's under the scan (a layer's step gathers its weights), every block's unrolled."""
    nofsdp = plan.plan(TINY, (8, 1, 1), batch=8, seq_len=4)
    assert nofsdp.terms["gathered_weights"] == 0
    unrolled = TINY.replace(scan_layers=False)
    fsdp = plan.plan(unrolled, (1, 8, 1), batch=8, seq_len=4)
    # Tiny: every weight but the q/k/v biases has an embed dim, so fsdp splits it.
    biases = sum(4 * x.size for p, x in jax.tree_util.tree_flatten_with_path(
        models.abstract_params(TINY))[0] if "bias" in jax.tree_util.keystr(p))  # fmt: skip
    assert fsdp.terms["gathered_weights"] == TINY.num_params() * 4 - biases
    # Tensor 2 halves what a device gathers.
    both = plan.plan(unrolled, (1, 4, 2), batch=8, seq_len=4)
    assert both.terms["gathered_weights"] == pytest.approx(fsdp.terms["gathered_weights"] / 2,
                                                           rel=0.02)  # fmt: skip
    deep = TINY.replace(n_layers=8)
    scanned = plan.plan(deep, (1, 8, 1), batch=8, seq_len=4).terms["gathered_weights"]
    all_layers = plan.plan(deep.replace(scan_layers=False), (1, 8, 1), batch=8,
                           seq_len=4).terms["gathered_weights"]  # fmt: skip
    assert scanned < all_layers / 3
    # Mixed precision: the bf16 casts are of the local shards plus the gathered block.
    mixed = plan.plan(unrolled.replace(dtype="bfloat16"), (1, 8, 1), batch=8, seq_len=4,
                      platform="gpu")  # fmt: skip
    assert mixed.terms["weight_copies"] == TINY.num_params() * 2


def test_planner_honours_remat_and_mixed_precision():
    kw = dict(batch=8, seq_len=64)
    act = {r: plan.plan(TINY.replace(remat=r), (1, 1, 1), **kw).terms["activations"]
           for r in ("none", "dots", "attn", "full")}  # fmt: skip
    assert act["none"] > act["dots"] > act["attn"] > act["full"]
    deep = TINY.replace(n_layers=16)
    assert (
        plan.plan(deep, (1, 1, 1), remat="full", **kw).temp_bytes
        < 0.5 * plan.plan(deep, (1, 1, 1), **kw).temp_bytes
    )
    # An unrolled stack is planned without remat (XLA may undo it).
    unrolled = plan.plan(deep.replace(scan_layers=False), (1, 1, 1), remat="full", **kw)
    assert unrolled.terms["activations"] == plan.plan(deep, (1, 1, 1), **kw).terms["activations"]
    assert any("unrolled" in n for n in unrolled.notes)
    # bf16 compute over f32 master weights: a bf16 copy of the weights (f32 on XLA:CPU, which
    # computes bf16 in f32); the master weights stay f32.
    bf16 = TINY.replace(dtype="bfloat16")
    for platform, itemsize in (("gpu", 2), ("tpu", 2), ("cpu", 4)):
        mixed = plan.plan(bf16, (1, 1, 1), platform=platform, **kw)
        assert mixed.terms["weight_copies"] == TINY.num_params() * itemsize
        assert mixed.terms["params"] == TINY.num_params() * 4
    assert plan.plan(TINY, (1, 1, 1), **kw).terms["weight_copies"] == 0
    # Activations of a bf16 model take 2 bytes per element on GPU/TPU, 4 on XLA:CPU.
    gpu = plan.plan(bf16, (1, 1, 1), platform="gpu", remat="full", **kw).terms["activations"]
    cpu = plan.plan(bf16, (1, 1, 1), platform="cpu", remat="full", **kw).terms["activations"]
    assert cpu == 2 * gpu


def test_distillation_logits_and_the_fused_path():
    """OPD's materialized loss holds five float32 [R, V] arrays (reverse KL); the fused path
    holds vocabulary blocks only, so the remat'd step needs less than half."""
    student = models.get_config("qwen2.5-0.5b", remat="full")
    kw = dict(batch=8, objective="opd", prompt_len=1024, completion_len=1024,
              teacher_config=student, platform="gpu")  # fmt: skip
    naive = plan.plan(student, (1, 8, 1), loss_impl="materialized", **kw)
    fused = plan.plan(student, (1, 8, 1), loss_impl="fused_linear", **kw)
    # Five [R, V] float32 arrays and two head-sized buffers ([V, D / fsdp] in bfloat16).
    assert naive.terms["backward_peak"] == 5 * 1 * 1024 * 151_936 * 4 + 2 * 151_936 * 112 * 2
    assert fused.temp_bytes < naive.temp_bytes / 2
    assert fused.terms["teacher"] == fused.terms["params"]


def test_kv_cache_term_is_sharded_over_data_and_kv_heads():
    config = models.get_config("qwen2.5-7b")  # K = 4 kv heads, bf16
    p = plan.plan(config, (2, 1, 4), batch=8, seq_len=4096, sample_batch=64, platform="gpu")
    L, E = config.n_layers, config.head_dim
    assert p.terms["kv_cache"] == L * 2 * (64 // 2) * (4 // 4) * 4096 * E * 2
    # The same bytes as the sampler's stacked cache, sharded by `cache_shardings`.
    cache = jax.eval_shape(lambda: models.init_cache(config, 64, 4096))
    mesh = plan.abstract_mesh((2, 1, 4))
    shardings = sharding.cache_shardings(config, mesh, 64, capacity=4096)
    assert p.terms["kv_cache"] == plan.tree_bytes((cache.k, cache.v), (shardings.k, shardings.v))
    # On CPU the sampler also holds its per-layer slices of the stacked blocks' weights.
    blocks = sharding.param_shardings(config, mesh)["layers"]
    cpu = plan.plan(config, (2, 1, 4), batch=8, seq_len=4096, sample_batch=64, platform="cpu")
    assert cpu.terms["decode_weights"] == plan.tree_bytes(
        models.abstract_params(config)["layers"], blocks
    )
    assert "decode_weights" not in plan.plan(config, (2, 1, 4), batch=8, seq_len=4096,
                                             sample_batch=64, platform="gpu").terms  # fmt: skip


def test_refuses_a_plan_larger_than_the_device_naming_the_biggest_term():
    config = models.get_config("qwen2.5-7b")
    p = plan.plan(config, (1, 1, 1), batch=8, seq_len=4096, device_memory_bytes=80 * plan.GiB)
    assert not p.fits and p.biggest == "activations"
    with pytest.raises(MemoryError, match=r"biggest term is activations .*remat=\"full\""):
        plan.check_fits(p)
    # More FSDP and full remat make the same model fit on 8 devices.
    ok = plan.plan(config, (1, 8, 1), batch=8, seq_len=4096, remat="full",
                   device_memory_bytes=80 * plan.GiB)  # fmt: skip
    assert plan.check_fits(ok) is ok
    # A model whose weights alone overflow names the parameters and asks for more fsdp.
    f32 = config.replace(param_dtype="float32", dtype="float32")
    big = plan.plan(f32, (1, 1, 1), batch=1, seq_len=16, device_memory_bytes=16 * plan.GiB)
    # (the optimizer's update, new state beside the old, is the largest term of the step)
    assert big.biggest in ("optimizer", "update") and "fsdp" in big.message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mesh_shape=(2, 2, 2), devices=4), r"has 8 devices but 4 are available"),
        (dict(mesh_shape="fsdp=4,pipeline=2"), r"unknown mesh axis name\(s\) \['pipeline'\]"),
        (dict(mesh_shape=(2, 2, 1), batch=6), r"batch 6 is not divisible by the data-parallel"),
        (dict(mesh_shape=(-1, 1, 1)), r"has a -1: pass the device count"),
        (dict(mesh_shape=(1, 1, 1), remat="some"), r"unknown remat policy"),
        (dict(mesh_shape=(1, 1, 1), seq_len=10_000), r"exceeds the model's max_seq_len"),
        (dict(mesh_shape=(1, 1, 1), objective="grpo"), r"'grpo' needs prompt_len"),
        (dict(mesh_shape=(1, 1, 1), loss_impl="fused"), r"unknown loss_impl 'fused'"),
        (dict(mesh_shape=(1, 1, 1), platform="npu"), r"unknown platform 'npu'"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    args = dict(batch=8, seq_len=16) | kwargs
    with pytest.raises(jaxpost.UserError, match=match):
        plan.plan(TINY, args.pop("mesh_shape"), **args)


def test_cli_prints_a_table_and_a_json_line(capsys, tmp_path):
    code = plan.main(["--model=qwen2.5-0.5b", "--mesh=1,8,1", "--batch=16", "--objective=opd",
                      "--prompt_len=256", "--completion_len=1024", "--teacher=qwen2.5-0.5b",
                      "--device_memory_gb=80"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "activations" in out and "teacher" in out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["fits"] and record["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}

    # A local HF directory: only config.json is read.
    hf_config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                 "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                 "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                 "tie_word_embeddings": True, "torch_dtype": "float32"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    assert plan.main([f"--model={tmp_path}", "--batch=2", "--seq_len=8"]) == 0
    capsys.readouterr()
    assert plan.main(["--model=tiny", "--mesh=2,2,2", "--devices=4", "--batch=8",
                      "--seq_len=8"]) == 2  # fmt: skip
    assert "sizes must multiply to the device count" in capsys.readouterr().err


@pytest.mark.slow
def test_module_exits_non_zero_when_it_does_not_fit():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpost.plan", "--model=llama3.1-8b", "--mesh=1,1,1",
         "--batch=4", "--seq_len=8192", "--device_memory_gb=80"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "plan does not fit" in proc.stderr and "biggest term is" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["fits"] is False


def test_bf16_compute_with_f32_master_weights_trains_a_finite_step():
    config = TINY.replace(dtype="bfloat16", param_dtype="float32")
    optimizer = train.make_optimizer(train.OptimConfig(learning_rate=1e-2, warmup_steps=0))
    state = train.init_state(models.init(config, seed=0), optimizer)
    rng = np.random.default_rng(0)
    batch = data.SequenceBatch(tokens=rng.integers(0, 64, (4, 16)).astype(np.int32),
                               attention_mask=np.ones((4, 16), np.int32),
                               loss_mask=np.ones((4, 16), np.int32))  # fmt: skip
    before = jax.tree.map(np.asarray, state.params)
    step = train.jit_step(train.make_step(train.sft_objective(config), optimizer))
    state, metrics = step(state, batch)
    assert int(metrics["finite"]) == 1 and np.isfinite(float(metrics["loss"]))
    chex.assert_tree_all_finite(state.params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(state.params),
                                                              jax.tree.leaves(before))]  # fmt: skip
    assert max(moved) > 0


def test_lora_plan_counts_the_adapters_optimizer_and_the_compiled_arguments():
    """lora_rank: the optimizer is the adapters' (AdamW: two moments of each adapter), the state
    shrinks, and the arguments equal those of the compiled LoRA step (base + adapters + their
    optimizer state + batch)."""
    from jaxpost import lora

    full = plan.plan(TINY, (1, 1, 1), batch=4, seq_len=32, platform="cpu")
    p = plan.plan(TINY, (1, 1, 1), batch=4, seq_len=32, platform="cpu", lora_rank=4)
    adapters = lora.init(models.init(TINY, seed=0), lora.LoraConfig(rank=4))
    n = lora.count(adapters)
    assert p.terms["adapters"] == 4 * n
    assert 2 * 4 * n <= p.terms["optimizer"] <= 2 * 4 * n + 64
    assert p.terms["optimizer"] < full.terms["optimizer"] / 4
    assert p.terms["merged_weights"] == p.terms["params"] == full.terms["params"]
    assert p.total < full.total  # the optimizer's saving is larger than the merged copy
    tx = train.make_optimizer(train.OptimConfig())
    step = train.make_step(lora.wrap_objective(train.sft_objective(TINY), lora.LoraConfig(rank=4)),
                           tx)  # fmt: skip
    state = jax.eval_shape(lambda a: train.init_state(a, tx), adapters)
    batch = data.SequenceBatch(*(jax.ShapeDtypeStruct((4, 32), jnp.int32),) * 3)
    base = models.abstract_params(TINY)
    m = jax.jit(step).lower(state, batch, base).compile().memory_analysis()
    planned = sum(p.terms[k] for k in ("params", "adapters", "optimizer", "batch"))
    assert abs(m.argument_size_in_bytes - planned) <= 0.02 * m.argument_size_in_bytes
