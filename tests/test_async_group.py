"""Requests entering a 2-rank engine group (gloo) on rank 0 through AsyncRolloutEngine while rank 1
follows: TP2 and EP2 alltoall, against the single-process engine."""
from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from parallel_checks import set_rank_env

PROMPTS = [[5 + i, 9, 40 + 3 * i, 7, 100 + i, 2 + i] for i in range(6)]


def params():
    from atom import SamplingParams
    return [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, n=1 + i % 2, max_tokens=6 + i,
                           logprobs=0, ignore_eos=True, return_routed_experts=i < 3) for i in range(len(PROMPTS))]


def kwargs(tp: int, ep: int, mode: str) -> dict:
    return dict(device="cpu", dtype="float32", num_kv_blocks=64, kv_block_size=4, max_num_seqs=8,
                max_model_len=64, tensor_parallel_size=tp, expert_parallel_size=ep, ep_mode=mode,
                dist_timeout_s=60, enable_return_routed_experts=True)


def _rank(rank: int, world: int, port: int, path: str, layout: tuple, out: str) -> None:
    set_rank_env(rank, world, port)
    import torch
    from atom import AsyncRolloutEngine, RolloutEngine, SamplingParams
    torch.set_num_threads(1)
    engine = RolloutEngine(path, **kwargs(*layout))
    if rank != 0:
        engine.follow()
    else:
        front = AsyncRolloutEngine(engine)

        async def main():
            outs = await asyncio.gather(*(front.generate(p, sp, request_id=f"r{i}")
                                          for i, (p, sp) in enumerate(zip(PROMPTS, params()))))
            # Aborted once its first tokens are out (not after a fixed sleep: under load the sleep
            # covered the whole request once in CI), with 59 steps still to go.
            long = front.stream([3, 4, 5], SamplingParams(max_tokens=60, ignore_eos=True), request_id="long")
            first = await long.__anext__()
            assert not first.finished
            aborted = await front.abort(["long", "nope"])
            async for _ in long:
                pass
            await front.shutdown()
            return outs, aborted
        outs, aborted = asyncio.run(main())
        with open(out, "w") as f:
            json.dump({"tokens": [[c.token_ids for c in o.outputs] for o in outs],
                       "logprobs": [[c.logprobs for c in o.outputs] for o in outs],
                       "routed": [[None if c.routed_experts is None else c.routed_experts.tolist() for c in o.outputs]
                                  for o in outs],
                       "aborted": {k: (None if v is None else v.outputs[0].finish_reason) for k, v in aborted.items()},
                       "free": engine.num_free_kv_blocks, "total": engine.num_kv_blocks}, f)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("layout", [(2, 1, "allreduce"), (1, 2, "alltoall")], ids=["tp2", "ep2_alltoall"])
def test_async_requests_on_rank0_of_an_engine_group(make_tiny_model, tmp_path, layout):
    from atom import RolloutEngine
    path = make_tiny_model("qwen3_moe")
    single = RolloutEngine(path, **kwargs(1, 1, "allreduce")).generate(PROMPTS, params())
    out = tmp_path / "rank0.json"
    mp.start_processes(_rank, args=(2, _free_port(), path, layout, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    got = json.loads(out.read_text())
    assert got["tokens"] == [[c.token_ids for c in o.outputs] for o in single]
    for a, b in zip(got["logprobs"], [[c.logprobs for c in o.outputs] for o in single]):
        for x, y in zip(a, b):
            assert x == pytest.approx(y, abs=1e-5)
    assert got["routed"] == [[None if c.routed_experts is None else c.routed_experts.tolist() for c in o.outputs]
                             for o in single]
    assert got["routed"][0][0] is not None and got["routed"][4][0] is None
    assert got["aborted"] == {"long": "abort", "nope": None}
    assert got["free"] == got["total"]
