"""A batch `generate` sharded over the replicas, surviving replica failures.

The prompts are cut into contiguous shards; each ready replica runs one shard at a time (the
least loaded first) and takes the next when it is done. A shard whose replica dies goes back to
the front of the queue for another replica (or the restarted one). Every request already carries
its seed (the pool draws missing seeds before sharding), so where a shard runs changes nothing.
"""
from __future__ import annotations

import re
from collections import deque
from typing import Callable

from atom.ray.replicas import READY, ReplicaSet, is_replica_failure, task_error


def shards_of(count: int, replicas: int, shard_size: int | None) -> list[tuple[int, int]]:
    """[start, end) ranges covering range(count): an even split over `replicas`, or `shard_size` each."""
    if count == 0:
        return []
    size = shard_size or -(-count // max(1, replicas))
    return [(s, min(s + size, count)) for s in range(0, count, size)]


def _shift_prompt_index(exc: BaseException, offset: int) -> BaseException:
    """An engine error names a prompt by its position in the shard: name it by its position in the call."""
    msg = str(exc)
    m = re.match(r"prompt (\d+)\b", msg)
    if m is None or offset == 0:
        return exc
    return type(exc)(f"prompt {int(m.group(1)) + offset}{msg[m.end():]}")


def run_sharded(rset: ReplicaSet, prompts: list, params: list, shard_size: int | None,
                heal: Callable[[], None], on_progress: Callable[[int], None] | None = None) -> list:
    """Outputs of every prompt, in input order; raises the engine's ValueError / RuntimeError as is,
    and RuntimeError when no replica is left."""
    import ray

    ready = rset.ids(READY)
    queue = deque(shards_of(len(prompts), len(ready) or 1, shard_size))
    results: list = [None] * len(prompts)
    # rank-0 ref -> (replica id, shard, all ranks' refs, the replica's restarts when sent: a failure
    # of a call to actors since restarted is not counted again). After an error, shards still running are left
    # to finish (cancelling would free the replica's lock while its engine still runs).
    inflight: dict = {}
    while queue or inflight:
        heal()
        busy = {rid for rid, *_ in inflight.values()}
        for rid in rset.ids(READY):
            if not queue:
                break
            if rid in busy:
                continue
            start, end = queue.popleft()
            seen = rset.replicas[rid].restarts
            refs = rset.submit(rid, "generate", prompts[start:end], params[start:end])
            inflight[refs[0]] = (rid, (start, end), refs, seen)
        if not inflight:
            rset.check_alive()
            rset.wait_for_any(timeout=1.0)
            continue
        done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        for ref in done:
            rid, (start, end), refs, seen = inflight.pop(ref)
            try:
                outs = ray.get(refs)[0]
            except Exception as e:  # noqa: BLE001
                if not is_replica_failure(e):
                    raise _shift_prompt_index(task_error(e), start) from None
                rset.fail(rid, "died during generate", e, seen)
                queue.appendleft((start, end))
                continue
            results[start:end] = outs
            if on_progress is not None:
                on_progress(end - start)
    return results
