"""A process group of its own for weight transfers between a trainer and rollout engines.

Built on a dedicated TCPStore, so neither side's default process group (torch.distributed's
WORLD, or the trainer's FSDP groups) is touched or even needed. Rank 0 is the trainer-side
sender; ranks 1..world_size-1 are engine ranks (every rank of every engine).

The group meets the store exactly as the frameworks' own helper does (OpenRLHF's and
open-instruct's `init_process_group`, SGLang's `init_custom_process_group`: torch's
`rendezvous("tcp://addr:port")`, `PrefixStore(group_name)`, then what torch's
`_new_process_group_helper` does for a group called `group_name`), so a trainer that builds its
side with that helper and calls `torch.distributed.broadcast(t, src, group=pg)` talks to an
atom engine unchanged, and atom's own two sides talk to each other as before.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions

DEFAULT_TIMEOUT_S = 600.0


class WeightSyncError(RuntimeError):
    """A transfer broke off: the peer died, or a step outlasted its timeout."""


class WeightSyncTimeout(WeightSyncError, TimeoutError):
    """A step outlasted its timeout."""


def _timedelta(seconds: float | datetime.timedelta) -> datetime.timedelta:
    return seconds if isinstance(seconds, datetime.timedelta) else datetime.timedelta(seconds=float(seconds))


@dataclass
class WeightSyncGroup:
    """One process group (gloo on CPU, nccl on NVIDIA, the same name gives RCCL on ROCm)."""

    pg: dist.ProcessGroup
    store: dist.Store
    rank: int
    world_size: int
    backend: str
    device: torch.device
    timeout: datetime.timedelta

    def broadcast(self, tensor: torch.Tensor, src: int = 0, timeout: float | datetime.timedelta | None = None,
                  what: str = "broadcast") -> None:
        """Blocking broadcast; WeightSyncError / WeightSyncTimeout when it cannot complete."""
        timeout = self.timeout if timeout is None else _timedelta(timeout)
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.timeout = src, 0, timeout
        start = time.monotonic()
        try:
            self._wait(self.pg.broadcast([tensor], opts), timeout)
        except WeightSyncError:
            raise
        except Exception as e:  # gloo: "Timed out ...", "Connection closed by peer", ...
            self._raise(what, start, timeout, e)

    def allgather_bytes(self, payload: bytes, size: int = 4096, timeout: float | datetime.timedelta | None = None,
                        what: str = "status exchange") -> list[bytes]:
        """Every rank's payload (at most `size` bytes each)."""
        timeout = self.timeout if timeout is None else _timedelta(timeout)
        payload = payload[:size]
        mine = torch.zeros(size + 8, dtype=torch.uint8)
        mine[:8] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
        if payload:
            mine[8:8 + len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        mine = mine.to(self.device)
        outs = [torch.empty_like(mine) for _ in range(self.world_size)]
        opts = AllgatherOptions()
        opts.timeout = timeout
        start = time.monotonic()
        try:
            self._wait(self.pg.allgather([outs], [mine], opts), timeout)
        except WeightSyncError:
            raise
        except Exception as e:
            self._raise(what, start, timeout, e)
        result = []
        for out in outs:
            out = out.cpu()
            n = int(out[:8].view(torch.int64)[0])
            result.append(out[8:8 + n].numpy().tobytes())
        return result

    def _wait(self, work, timeout: datetime.timedelta) -> None:
        if self.backend == "gloo":
            work.wait()  # gloo enforces the per-op timeout itself
            return
        # NCCL: wait() would only order streams; poll so a dead peer cannot hang us forever.
        deadline = time.monotonic() + timeout.total_seconds()
        while not work.is_completed():
            if time.monotonic() > deadline:
                abort = getattr(self.pg, "abort", None)
                if abort is not None:
                    abort()
                raise WeightSyncTimeout(f"weight sync: no progress for {timeout.total_seconds():.1f} s; the group "
                                        "was aborted (create a new one with init_weight_sync_group)")
            time.sleep(0.0002)
        work.wait()

    def _raise(self, what: str, start: float, timeout: datetime.timedelta, e: Exception):
        waited = time.monotonic() - start
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        timed_out = "timed out" in text.lower() or "timeout" in text.lower()
        cls = WeightSyncTimeout if timed_out else WeightSyncError
        why = (f"timed out after {waited:.1f} s (timeout {timeout.total_seconds():g} s)" if timed_out
               else f"the peer is gone after {waited:.1f} s")
        raise cls(f"weight sync: {what} failed: {why}: {text}") from e

    def close(self) -> None:
        shutdown = getattr(self.pg, "shutdown", None) or getattr(self.pg, "_shutdown", None)
        try:
            if shutdown is not None:
                shutdown()
        except Exception:
            pass


def init_weight_sync_group(master_addr: str, master_port: int, rank: int, world_size: int,
                           backend: str = "gloo", timeout: float | datetime.timedelta = DEFAULT_TIMEOUT_S,
                           device: torch.device | str | None = None,
                           group_name: str = "atom_weight_sync") -> WeightSyncGroup:
    """Join the weight-sync group: call on the trainer (rank 0) and on every engine rank.

    master_addr/master_port: where rank 0 hosts the group's own TCPStore (a free port, not the
        trainer's MASTER_PORT). backend: "gloo" (CPU tensors) or "nccl" (GPU; RCCL on ROCm).
    timeout: default for every step (seconds); the receiver's first wait can override it.
    device: the transfer device for nccl (default: the current CUDA device).
    """
    if not 0 <= rank < world_size or world_size < 2:
        raise ValueError(f"init_weight_sync_group: need 0 <= rank < world_size and world_size >= 2, "
                         f"got rank={rank}, world_size={world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"init_weight_sync_group: backend must be 'gloo' or 'nccl', got {backend!r}")
    if not isinstance(group_name, str) or not group_name:
        raise ValueError(f"init_weight_sync_group: group_name must be a non-empty string, got {group_name!r}")
    td = _timedelta(timeout)
    dev = torch.device("cpu")
    if backend == "nccl":
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    store = dist.TCPStore(master_addr, int(master_port), world_size, is_master=rank == 0, timeout=td,
                          wait_for_workers=True, multi_tenant=True)
    pg = _backend_group(_group_store(store, group_name), rank, world_size, backend, td)
    return WeightSyncGroup(pg=pg, store=store, rank=rank, world_size=world_size, backend=backend, device=dev,
                           timeout=td)


def _group_store(store: dist.Store, group_name: str) -> dist.Store:
    """The store prefix of a group named `group_name` made by the frameworks' helper:
    `PrefixStore(group_name, store)` (the helper's), then `f"{group_name}/"` (torch's
    `_new_process_group_helper`, which names the group's keys after the group)."""
    return dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store))


def _backend_group(store: dist.Store, rank: int, world_size: int, backend: str, td: datetime.timedelta):
    """The backend torch's `_new_process_group_helper` builds for one backend name: on the
    prefix of its first device ("cpu/" for gloo, "cuda/" for nccl), with the group's sequence
    number agreed through the store (rank 0 sets it, the others wait for it: a peer built by
    torch's helper waits for ours). Built here, not by the helper itself, so that nothing is
    registered in torch.distributed's global state: the same group name can be joined again
    after a broken transfer, and neither side's default group is needed."""
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", store), rank, world_size, td)
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = td
        opts.is_high_priority_stream = False
        pg = dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", store), rank, world_size, opts)
    pg._set_sequence_number_for_group()
    return pg
