"""Multi-rank checks of tensor / expert parallelism, run by every rank of one engine group.

* CPU: tests/test_parallel.py spawns the ranks (gloo).
* GPU: scripts/multi_gpu_check.sh runs ``torchrun --nproc-per-node N tests/parallel_checks.py ...`` (NCCL).

Each rank builds the sharded engine of a scenario and a single-process engine on the same
checkpoint, runs the same requests through both, and checks: identical tokens, logprobs within
--atol, identical outputs on every rank, and (update) that update_weights leaves each rank with
exactly the shard a fresh sharded load gives. The ranks read torchrun's environment variables
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); the engine initialises torch.distributed from them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

# name -> (arch, tensor_parallel_size, expert_parallel_size, ep_mode)
SCENARIOS = {
    "tp2_dense": ("qwen3", 2, 1, "allreduce"),
    "tp2_moe": ("qwen3_moe", 2, 1, "allreduce"),
    "ep2_allreduce": ("qwen3_moe", 1, 2, "allreduce"),
    "ep2_alltoall": ("qwen3_moe", 1, 2, "alltoall"),
    "tp2_ep2": ("qwen3_moe", 2, 2, "allreduce"),
    # 4 ranks: TP sub-groups inside the engine group, replicated KV heads (TP=4 > 2 KV heads),
    # experts split 4 ways; "tp2_dense" on 4 ranks runs two 2-rank engines side by side.
    "tp2_ep4": ("qwen3_moe", 2, 4, "allreduce"),
    "tp4_ep2": ("qwen3_moe", 4, 2, "allreduce"),
    "ep4_alltoall": ("qwen3_moe", 1, 4, "alltoall"),
}
# The MoE families of issue 17 (tests/test_families.py): TP=2 (experts' intermediate dim split
# in two), TP=2 + EP=2, and EP=2 alltoall.
FAMILIES = ("mixtral", "gpt_oss", "deepseek_v3", "deepseek_v3_no_qlora")  # keys of --models
for _arch in FAMILIES:
    SCENARIOS[f"{_arch}_tp2"] = (_arch, 2, 1, "allreduce")
    SCENARIOS[f"{_arch}_tp2_ep2"] = (_arch, 2, 2, "allreduce")
    SCENARIOS[f"{_arch}_ep2_alltoall"] = (_arch, 1, 2, "alltoall")
# The dense families of tests/test_dense_families.py: Qwen2's q / k / v biases split with their heads.
SCENARIOS["qwen2_tp2"] = ("qwen2", 2, 1, "allreduce")
UPDATE_ARCHS = (*FAMILIES, "qwen2")  # every scenario of these checks update_weights too
TWO_RANKS = ("tp2_dense", "tp2_moe", "ep2_allreduce", "ep2_alltoall", "tp2_ep2")
FOUR_RANKS = ("tp2_ep4", "tp4_ep2", "ep4_alltoall", "tp2_dense")
# Scenarios that also check update_weights (full HF tensors in, each rank keeps its shard).
UPDATE_SCENARIOS = ("tp2_ep2", "ep2_alltoall", "tp2_dense")


def engine_kwargs(device: str) -> dict:
    # Small blocks and token budget: paging, chunked prefill and several decode steps get exercised.
    return dict(device=device, dtype="float32", num_kv_blocks=96, kv_block_size=4, max_num_seqs=4,
                max_num_batched_tokens=24, seed=7)


def requests(vocab: int):
    from atom import SamplingParams

    g = torch.Generator().manual_seed(123)
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (5, 19, 33, 11)]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True)
    params = [greedy, SamplingParams(temperature=0.0, max_tokens=5, logprobs=0, prompt_logprobs=1, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, n=2, max_tokens=6, logprobs=0, seed=99, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, max_tokens=10, logprobs=1, ignore_eos=True)]
    return prompts, params


def summarize(outputs) -> list:
    """Plain data of a generate call's outputs (comparable across ranks and engines)."""
    out = []
    for o in outputs:
        out.append({
            "prompt_logprobs": o.prompt_logprobs,
            "completions": [(c.index, c.token_ids, c.logprobs, c.top_logprobs, c.finish_reason)
                            for c in o.outputs],
        })
    return out


def compare(name: str, got: list, want: list, atol: float) -> float:
    """Tokens identical, logprobs within atol; returns the largest logprob difference."""
    worst = 0.0
    assert len(got) == len(want), f"{name}: {len(got)} outputs vs {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g["completions"]) == len(w["completions"]), f"{name}: prompt {i} completions differ"
        for (gi, gt, glp, gtop, gfr), (wi, wt, wlp, wtop, wfr) in zip(g["completions"], w["completions"]):
            assert (gi, gt, gfr) == (wi, wt, wfr), f"{name}: prompt {i} sample {gi}: tokens {gt} vs single-process {wt}"
            d = max((abs(a - b) for a, b in zip(glp, wlp)), default=0.0)
            for ga, wa in zip(gtop, wtop):
                assert set(ga) == set(wa), f"{name}: prompt {i}: top-logprob ids {sorted(ga)} vs {sorted(wa)}"
                d = max(d, max(abs(ga[k] - wa[k]) for k in ga))
            worst = max(worst, d)
            assert d <= atol, f"{name}: prompt {i} sample {gi}: logprobs differ by {d} > {atol}"
        gp, wp = g["prompt_logprobs"], w["prompt_logprobs"]
        assert (gp is None) == (wp is None), f"{name}: prompt {i}: prompt_logprobs presence differs"
        for ga, wa in zip(gp or [], wp or []):
            if wa is None:
                assert ga is None
                continue
            assert set(ga) == set(wa), f"{name}: prompt {i}: prompt-logprob ids differ"
            d = max(abs(ga[k] - wa[k]) for k in ga)
            worst = max(worst, d)
            assert d <= atol, f"{name}: prompt {i}: prompt logprobs differ by {d} > {atol}"
    return worst


def check_shards_equal(engine, path: str, layout_args: tuple, rank: int) -> None:
    """This rank's parameters == a fresh sharded load of `path` (no process group needed)."""
    from atom.distributed import ParallelState
    from atom.models.hf_config import load_model_args
    from atom.models.registry import model_class
    from atom.models.weights import WeightMap, load_checkpoint

    args = load_model_args(path)
    tp, ep, mode = layout_args
    with torch.device("cpu"):
        fresh = model_class(args.architecture)(args, ParallelState.unconnected(tp, ep, mode, rank))
    load_checkpoint(fresh, WeightMap(fresh), path)
    mine = dict(engine.named_parameters())
    theirs = dict(fresh.named_parameters())
    assert mine.keys() == theirs.keys()
    for k, v in theirs.items():
        assert mine[k].shape == v.shape, f"{k}: shape {tuple(mine[k].shape)} vs fresh sharded load {tuple(v.shape)}"
        assert torch.equal(mine[k].detach().cpu().float(), v.float()), f"rank {rank}: {k} differs from a fresh sharded load"


def run_scenario(name: str, models: dict, device: str, atol: float, update_to: dict | None) -> dict:
    import atom.distributed.parallel_state as ps
    from atom import RolloutEngine
    from atom.models.weights import iter_checkpoint

    ps.DEBUG_SYNC_CHECKS = True  # every step: all ranks of an engine sampled the same tokens
    arch, tp, ep, mode = SCENARIOS[name]
    path = models[arch]
    rank = int(os.environ["RANK"])
    t0 = time.perf_counter()
    single = RolloutEngine(path, **engine_kwargs(device))
    sharded = RolloutEngine(path, tensor_parallel_size=tp, expert_parallel_size=ep, ep_mode=mode,
                            dist_timeout_s=float(os.environ.get("ATOM_TEST_DIST_TIMEOUT", 60)), **engine_kwargs(device))
    prompts, params = requests(single.vocab_size)
    want = summarize(single.generate(prompts, params))
    got = summarize(sharded.generate(prompts, params))
    result = {"scenario": name, "rank": rank, "max_logprob_diff": compare(name, got, want, atol)}
    # The same outputs on every rank of the engine (SPMD in, SPMD out).
    everyone = [None] * int(os.environ["WORLD_SIZE"])
    torch.distributed.all_gather_object(everyone, json.dumps(got, sort_keys=True))
    width = max(tp, ep)  # an engine group: `width` consecutive ranks
    mine = everyone[rank - sharded.engine_rank: rank - sharded.engine_rank + width]
    assert len(mine) == width and all(e == mine[0] for e in mine), f"{name}: ranks returned different outputs"
    result["param_elems_here"] = sum(p.numel() for _, p in sharded.named_parameters())
    result["param_elems_single"] = sum(p.numel() for _, p in single.named_parameters())
    if update_to is not None and (name in UPDATE_SCENARIOS or arch in UPDATE_ARCHS):
        new_path = update_to[arch]
        version = sharded.update_weights(iter_checkpoint(new_path))
        check_shards_equal(sharded, new_path, (tp, ep, mode), sharded.engine_rank)
        single.update_weights(iter_checkpoint(new_path))
        got2 = summarize(sharded.generate(prompts, params))
        want2 = summarize(single.generate(prompts, params))
        assert got2 != got, f"{name}: the update changed nothing"
        result["max_logprob_diff_after_update"] = compare(name + " after update_weights", got2, want2, atol)
        result["weight_version"] = version
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="JSON {arch: checkpoint dir}")
    p.add_argument("--update-models", default=None, help="JSON {arch: checkpoint dir} to update_weights to")
    p.add_argument("--scenarios", default=None, help="comma-separated names (default: those for WORLD_SIZE 2 or 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--out", default=None, help="directory for per-rank JSON results")
    p.add_argument("--failure", default=None, choices=["startup", "collective"],
                   help="instead: rank 1 fails; rank 0 must raise within --timeout (2 ranks)")
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.device.startswith("cuda"):  # one GPU per rank, for the single-process reference engine too
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    models = json.loads(a.models)
    if a.failure:
        out = a.out or "."
        failure_case(a.failure, models["qwen3"], a.timeout, out, a.device)
        if int(os.environ["RANK"]) == 0:
            with open(os.path.join(out, f"{a.failure}.json")) as f:
                result = json.load(f)
            print(json.dumps(result), flush=True)
            ok = result["error"] and "atom.distributed" in result["error"] and result["seconds"] < a.timeout + 30
            if not ok:
                print(f"rank 0 did not raise a clear error in time: {result}", file=sys.stderr, flush=True)
                os._exit(1)
        sys.stdout.flush()
        os._exit(0)  # a process group that timed out may abort in its teardown at exit; skip it
    update_to = json.loads(a.update_models) if a.update_models else None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    names = a.scenarios.split(",") if a.scenarios else {2: TWO_RANKS, 4: FOUR_RANKS}.get(world, ())
    if not names:
        raise SystemExit(f"no default scenarios for WORLD_SIZE={world}; pass --scenarios")
    results = [run_scenario(s, models, a.device, a.atol, update_to) for s in names]
    if a.out:
        with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    if rank == 0:
        for r in results:
            print(json.dumps(r), flush=True)
    return 0


# ---- spawned by tests/test_parallel.py ----------------------------------------------------
def set_rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def spawned_checks(rank: int, world: int, port: int, argv: list[str]) -> None:
    set_rank_env(rank, world, port)
    code = main(argv)
    # Interpreter teardown with live gloo groups sometimes aborts ("terminate called without an
    # active exception", seen once in ~5 full-suite runs): let every rank finish, then leave
    # without running the process groups' destructors.
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawned_failure(rank: int, world: int, port: int, case: str, path: str, timeout: float, out: str) -> None:
    set_rank_env(rank, world, port)
    failure_case(case, path, timeout, out, "cpu")
    os._exit(0)  # a process group that timed out may abort in its teardown at exit; skip it


def failure_case(case: str, path: str, timeout: float, out: str, device: str) -> None:
    """Rank 1 fails (case "startup": exits before building its engine; "collective": builds it,
    then stops calling it); rank 0 writes what it raised and how long that took to out/CASE.json."""
    from atom import RolloutEngine, SamplingParams

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    kwargs = dict(tensor_parallel_size=2, dist_timeout_s=timeout, **engine_kwargs(device))
    if rank == 1 and case == "startup":
        return  # "crashed" before joining: rank 0 must not wait forever
    t0 = time.perf_counter()
    try:
        engine = RolloutEngine(path, **kwargs)
        if rank == 1:  # case "collective": alive but never calls generate
            time.sleep(timeout + 1.5)
            return
        t0 = time.perf_counter()
        engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4))
        error = None
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    if rank == 0:
        with open(os.path.join(out, f"{case}.json"), "w") as f:
            json.dump({"error": error, "seconds": time.perf_counter() - t0}, f)

if __name__ == "__main__":
    sys.exit(main())


def spawned_plain_exit(rank: int, world: int, port: int, path: str) -> None:
    """Build a TP engine, generate, and leave through normal interpreter exit (no os._exit)."""
    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    from atom import RolloutEngine, SamplingParams
    engine = RolloutEngine(path, tensor_parallel_size=world, kv_cache_memory_bytes=16 << 20)
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3))
