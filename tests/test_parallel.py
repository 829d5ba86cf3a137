"""Tensor and expert parallelism on CPU: gloo, 2 spawned ranks (issue 5).

The multi-rank checks live in tests/parallel_checks.py (also run on GPUs by
scripts/multi_gpu_check.sh); here they are spawned with torchrun-like environment variables.
"""
from __future__ import annotations

import dataclasses
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

import parallel_checks
from atom.config import EngineConfig
from atom.distributed import EngineLayout, ParallelState, check_shardable
from atom.models.hf_config import load_model_args
from atom.models.registry import model_class
from atom.models.weights import WeightMap, iter_checkpoint, load_checkpoint, load_weights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(make_tiny_model):
    return {"qwen3": make_tiny_model("qwen3", tie_word_embeddings=True), "qwen3_moe": make_tiny_model("qwen3_moe")}


@pytest.fixture(scope="module")
def updated_models(make_tiny_model):
    return {"qwen3": make_tiny_model("qwen3", tie_word_embeddings=True, seed=1),
            "qwen3_moe": make_tiny_model("qwen3_moe", seed=1)}


# ---- layouts and shapes (no processes) ----------------------------------------------------
def test_layouts():
    lay = EngineLayout.build(2, 2, "allreduce", rank=1)
    assert (lay.world, lay.tp_rank, lay.ep_rank, lay.moe_tp, lay.dp) == (2, 1, 1, 1, 1)
    lay = EngineLayout.build(2, 1, "allreduce", rank=1)   # TP only: experts split on their intermediate dim
    assert (lay.world, lay.ep_rank, lay.moe_tp, lay.moe_tp_rank) == (2, 0, 2, 1)
    lay = EngineLayout.build(2, 4, "allreduce", rank=3)   # attention TP=2 replicated twice
    assert (lay.world, lay.tp_ranks, lay.ep_rank, lay.moe_tp) == (4, (2, 3), 3, 1)
    lay = EngineLayout.build(4, 2, "allreduce", rank=3)
    assert (lay.world, lay.ep_rank, lay.moe_tp, lay.moe_tp_rank) == (4, 1, 2, 1)
    lay = EngineLayout.build(1, 4, "alltoall", rank=2)
    assert (lay.world, lay.dp, lay.ep_rank) == (4, 4, 2)
    lay = EngineLayout.build(2, 1, "alltoall", rank=1)    # no EP: nothing to exchange, plain TP
    assert (lay.mode, lay.world, lay.dp, lay.moe_tp) == ("allreduce", 2, 1, 2)
    for tp, ep, mode in [(2, 3, "allreduce"), (2, 2, "alltoall"), (0, 1, "allreduce"), (1, 2, "ring")]:
        with pytest.raises(ValueError):
            EngineLayout.build(tp, ep, mode)


def test_config_validation():
    EngineConfig(model="m", tensor_parallel_size=2, expert_parallel_size=2)
    with pytest.raises(ValueError, match="must divide one another"):
        EngineConfig(model="m", tensor_parallel_size=2, expert_parallel_size=3)
    with pytest.raises(ValueError, match="needs tensor_parallel_size=1"):
        EngineConfig(model="m", tensor_parallel_size=2, expert_parallel_size=2, ep_mode="alltoall")
    with pytest.raises(ValueError, match="ep_mode"):
        EngineConfig(model="m", ep_mode="ring")
    with pytest.raises(ValueError, match="dist_timeout_s"):
        EngineConfig(model="m", dist_timeout_s=0)


def test_sizes_that_do_not_divide_give_a_clear_error(models):
    args = load_model_args(models["qwen3_moe"])
    cls = model_class(args.architecture)
    with pytest.raises(ValueError, match="num_key_value_heads=3 must divide"):
        cls(dataclasses.replace(args, num_attention_heads=6, num_key_value_heads=3),
            ParallelState.unconnected(tp=2))
    with pytest.raises(ValueError, match="vocab_size=255"):
        cls(dataclasses.replace(args, vocab_size=255), ParallelState.unconnected(tp=2))
    with pytest.raises(ValueError, match="num_experts=6"):
        cls(dataclasses.replace(args, num_experts=6), ParallelState.unconnected(ep=4))
    with pytest.raises(ValueError, match="moe_intermediate_size=33"):
        cls(dataclasses.replace(args, moe_intermediate_size=33), ParallelState.unconnected(tp=2))
    with pytest.raises(ValueError, match="no MoE layers"):
        check_shardable(load_model_args(models["qwen3"]), EngineLayout.build(1, 2, "allreduce"))


def _fused_v5(path: str):
    """The checkpoint with experts in transformers-v5 fused layout (gate_up_proj / down_proj)."""
    tensors = dict(iter_checkpoint(path))
    layers = sorted({k.split(".experts.")[0] for k in tensors if ".experts." in k})
    for prefix in layers:
        ids = sorted({int(k.split(".experts.")[1].split(".")[0]) for k in tensors if k.startswith(prefix + ".experts.")})
        gate_up = torch.stack([torch.cat([tensors.pop(f"{prefix}.experts.{e}.gate_proj.weight"),
                                          tensors.pop(f"{prefix}.experts.{e}.up_proj.weight")]) for e in ids])
        down = torch.stack([tensors.pop(f"{prefix}.experts.{e}.down_proj.weight") for e in ids])
        tensors[f"{prefix}.experts.gate_up_proj"], tensors[f"{prefix}.experts.down_proj"] = gate_up, down
    return list(tensors.items())


@pytest.mark.parametrize("tp,ep,mode", [(2, 1, "allreduce"), (1, 2, "allreduce"), (2, 2, "allreduce"),
                                        (1, 2, "alltoall"), (4, 2, "allreduce")])
def test_each_rank_keeps_exactly_its_shard(models, tp, ep, mode):
    """Sharded safetensors reads (get_slice), full tensors narrowed by copy_into (the
    update_weights path), and v5 fused expert tensors all give each rank the same shard, and the
    shards put back together are the single-process parameters."""
    path = models["qwen3_moe"]
    args = load_model_args(path)
    cls = model_class(args.architecture)
    full = cls(args)
    load_weights(full, WeightMap(full), iter_checkpoint(path))
    full_p = dict(full.named_parameters())
    world = EngineLayout.build(tp, ep, mode).world
    for rank in range(world):
        state = ParallelState.unconnected(tp, ep, mode, rank)
        models_by_path = []
        for loader in ("slices", "full", "fused"):
            m = cls(args, state)
            wm = WeightMap(m)
            if loader == "slices":
                load_checkpoint(m, wm, path)
            elif loader == "full":
                load_weights(m, wm, iter_checkpoint(path))
            else:
                load_weights(m, wm, _fused_v5(path))
            models_by_path.append(dict(m.named_parameters()))
        a, b, c = models_by_path
        for k in a:
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), (rank, k)
        lay = state.layout
        hq, d, kv = args.num_attention_heads // tp, args.head_dim, args.num_key_value_heads
        hkv, kv_block = (kv // tp, lay.tp_rank) if tp <= kv else (1, lay.tp_rank // (tp // kv))  # replicated KV
        qkv = a["model.layers.0.self_attn.qkv_proj.weight"]
        fq = full_p["model.layers.0.self_attn.qkv_proj.weight"]
        q_rows = slice(lay.tp_rank * hq * d, (lay.tp_rank + 1) * hq * d)
        k_rows = slice(args.num_attention_heads * d + kv_block * hkv * d,
                       args.num_attention_heads * d + (kv_block + 1) * hkv * d)
        v_rows = slice(k_rows.start + kv * d, k_rows.stop + kv * d)
        assert qkv.shape[0] == (hq + 2 * hkv) * d
        assert torch.equal(qkv[:hq * d], fq[q_rows]) and torch.equal(qkv[hq * d:hq * d + hkv * d], fq[k_rows])
        assert torch.equal(qkv[(hq + hkv) * d:], fq[v_rows])
        o = a["model.layers.0.self_attn.o_proj.weight"]
        assert torch.equal(o, full_p["model.layers.0.self_attn.o_proj.weight"][:, q_rows])
        v = args.vocab_size // tp
        assert torch.equal(a["lm_head.weight"], full_p["lm_head.weight"][lay.tp_rank * v:(lay.tp_rank + 1) * v])
        w13 = a["model.layers.1.mlp.w13"]
        e_local, i_local = args.num_experts // ep, args.moe_intermediate_size // lay.moe_tp
        assert w13.shape == (e_local, 2 * i_local, args.hidden_size)
        fw13 = full_p["model.layers.1.mlp.w13"][lay.ep_rank * e_local:(lay.ep_rank + 1) * e_local]
        inter = args.moe_intermediate_size
        rows = slice(lay.moe_tp_rank * i_local, (lay.moe_tp_rank + 1) * i_local)
        assert torch.equal(w13[:, :i_local], fw13[:, :inter][:, rows])
        assert torch.equal(w13[:, i_local:], fw13[:, inter:][:, rows])


# ---- spawned ranks ------------------------------------------------------------------------
def _spawn(fn, args, world: int = 2):
    mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, join=True, start_method="spawn")


def test_parallel_engines_match_single_process(models, updated_models, tmp_path):
    """TP=2 (dense, MoE), EP=2 allreduce, EP=2 alltoall, TP=2+EP=2: greedy and seeded-sampled
    tokens identical to the single-process engine, logprobs within 1e-5, the same outputs on
    both ranks (plus a per-step all-gather check of sampled tokens), and update_weights leaving
    each rank exactly the shard of a fresh sharded load."""
    argv = ["--models", json.dumps(models), "--update-models", json.dumps(updated_models),
            "--out", str(tmp_path), "--atol", "1e-5"]
    _spawn(parallel_checks.spawned_checks, (argv,))
    results = {r["scenario"]: r for r in json.loads((tmp_path / "rank0.json").read_text())}
    assert set(results) == set(parallel_checks.TWO_RANKS)
    for name in parallel_checks.UPDATE_SCENARIOS:
        assert results[name]["weight_version"] == 1
    # Experts really are split: an EP=2 rank holds about half the MoE parameters.
    ep = results["ep2_allreduce"]
    assert ep["param_elems_here"] < 0.75 * ep["param_elems_single"]


def test_four_ranks(models, tmp_path):
    """TP sub-groups (TP=2, EP=4), replicated KV heads (TP=4 > 2 KV heads, experts' intermediate
    dim split 2 ways), EP=4 alltoall, and two 2-rank TP engines carved out of one 4-rank world."""
    argv = ["--models", json.dumps(models), "--out", str(tmp_path), "--atol", "1e-5"]
    _spawn(parallel_checks.spawned_checks, (argv,), world=4)
    results = {r["scenario"]: r for r in json.loads((tmp_path / "rank0.json").read_text())}
    assert set(results) == set(parallel_checks.FOUR_RANKS)


@pytest.mark.parametrize("case", ["startup", "collective"])
def test_a_failed_rank_makes_the_others_raise_within_the_timeout(models, tmp_path, case):
    timeout = 3.0
    _spawn(parallel_checks.spawned_failure, (case, models["qwen3"], timeout, str(tmp_path)))
    result = json.loads((tmp_path / f"{case}.json").read_text())
    assert result["error"] is not None, "rank 0 should have raised"
    assert "atom.distributed" in result["error"], result["error"]
    assert result["seconds"] < timeout + 5, result


def test_engine_processes_exit_cleanly(models):
    """Without destroying atom's gloo groups before interpreter teardown, about one exit in six
    aborted ('terminate called without an active exception'); six clean exits in a row."""
    for _ in range(6):
        _spawn(parallel_checks.spawned_plain_exit, (models["qwen3_moe"],))
