"""Which ranks shard what, and the process groups that connect them.

One *engine group* of W ranks serves one `RolloutEngine`. Its layout (see `EngineLayout`):

* ``ep_mode="allreduce"`` (default): W = max(TP, EP). Every rank runs the same requests (SPMD,
  replicated scheduler). Attention heads, dense MLPs and the vocabulary are split over TP groups of
  TP consecutive ranks (replicated W/TP times when EP > TP). Each MoE layer is an EP x (W/EP) grid
  over the W ranks: rank r holds experts [ep_rank*E/EP, ...) with their intermediate dim split
  W/EP ways; tokens are replicated, and one all-reduce over the engine group sums the outputs.
* ``ep_mode="alltoall"``: W = EP, TP must be 1. Attention is data-parallel: each rank runs its own
  share of the requests with its own scheduler and KV cache; MoE layers send each token to the
  ranks owning its experts and back (all_to_all_single), all ranks stepping in lockstep.

TP = EP = 1 is `ParallelState.single()`: no process group, no collective, no torch.distributed.
"""
from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

# Tests turn this on in their worker processes: after every sampling step the ranks that run the
# same requests all-gather their sampled tokens and raise if they differ.
DEBUG_SYNC_CHECKS = False

_ENGINE_GROUP: Any = None  # set_engine_group(); None: carve engine groups out of the default group


class CollectiveError(RuntimeError):
    """A collective of the engine group failed or timed out (another rank probably failed)."""


class ParallelGroup:
    """Ranks that run one collective together. size == 1: every method is the identity.

    Failures (a peer that died, or one that stopped calling the engine for longer than the
    group's timeout) surface as CollectiveError naming the group and the operation.
    """

    def __init__(self, name: str, group: Any = None, size: int = 1, rank: int = 0,
                 timeout_s: float | None = None, ranks: tuple[int, ...] = ()) -> None:
        self.name, self.group, self.size, self.rank = name, group, size, rank
        self.timeout_s, self.ranks = timeout_s, ranks

    def __repr__(self) -> str:
        return f"ParallelGroup({self.name}, rank {self.rank}/{self.size}, global ranks {list(self.ranks)})"

    def _fail(self, op: str, exc: BaseException) -> CollectiveError:
        return CollectiveError(
            f"atom.distributed: {op} on the {self.name} group failed on rank {self.rank} of {self.size} "
            f"(global ranks {list(self.ranks)}; timeout {self.timeout_s}s): {exc}. Another rank of the "
            "engine group probably failed, or stopped calling the engine: every rank must make the same "
            "engine calls (generate, update_weights, ...) with the same arguments.")

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place; returns x."""
        if self.size == 1:
            return x
        import torch.distributed as dist
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        try:
            dist.all_reduce(x, op=reduce_op, group=self.group)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise self._fail("all_reduce", e) from e
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenation along dim of every rank's x (same shapes), in rank order."""
        if self.size == 1:
            return x
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(self.size)]
        try:
            dist.all_gather(parts, x.contiguous(), group=self.group)
        except Exception as e:  # noqa: BLE001
            raise self._fail("all_gather", e) from e
        return torch.cat(parts, dim=dim)

    def all_to_all(self, x: torch.Tensor, recv_counts: list[int], send_counts: list[int]) -> torch.Tensor:
        """Rows [sum(send_counts), ...] sent send_counts[r] to rank r; returns the rows received."""
        if self.size == 1:
            return x
        import torch.distributed as dist
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        try:
            dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.group)
        except Exception as e:  # noqa: BLE001
            raise self._fail("all_to_all_single", e) from e
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        import torch.distributed as dist
        out: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except Exception as e:  # noqa: BLE001
            raise self._fail("all_gather_object", e) from e
        return out

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether flag is true on any rank (one tiny all-reduce)."""
        if self.size == 1:
            return flag
        return bool(self.all_reduce(torch.tensor([int(flag)], device=device), "max").item())


@dataclass(frozen=True)
class EngineLayout:
    """Pure rank arithmetic of one engine group (no process groups): what rank r of W holds."""

    tp: int
    ep: int
    mode: str
    world: int
    rank: int

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def tp_ranks(self) -> tuple[int, ...]:
        """Engine-group ranks of this rank's TP group (consecutive)."""
        lo = self.rank - self.tp_rank
        return tuple(range(lo, lo + self.tp))

    @property
    def moe_tp(self) -> int:
        """Ways each expert's intermediate dim is split (allreduce mode, W > EP)."""
        return self.world // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank // self.moe_tp

    @property
    def moe_tp_rank(self) -> int:
        return self.rank % self.moe_tp

    @property
    def dp(self) -> int:
        """Ranks that run their own requests (data-parallel attention)."""
        return self.world if self.mode == "alltoall" else 1

    @staticmethod
    def build(tp: int, ep: int, mode: str, rank: int = 0) -> "EngineLayout":
        if tp < 1 or ep < 1:
            raise ValueError(f"tensor_parallel_size={tp} and expert_parallel_size={ep} must be >= 1")
        if mode == "alltoall":
            if tp != 1 and ep > 1:
                raise ValueError("ep_mode='alltoall' (data-parallel attention) needs tensor_parallel_size=1; "
                                 f"got tensor_parallel_size={tp}; use ep_mode='allreduce' to combine TP and EP")
            world = max(tp, ep)
            if ep == 1:  # no experts to exchange: plain TP (tokens replicated, MoE all-reduced)
                mode = "allreduce"
        elif mode == "allreduce":
            world = max(tp, ep)
            if world % tp or world % ep:
                raise ValueError(f"ep_mode='allreduce': tensor_parallel_size={tp} and expert_parallel_size={ep} "
                                 "must divide one another (the engine group has max of the two ranks)")
        else:
            raise ValueError(f"ep_mode must be 'allreduce' or 'alltoall', got {mode!r}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside an engine group of {world}")
        return EngineLayout(tp, ep, mode, world, rank)


def check_shardable(args, layout: EngineLayout) -> None:
    """ValueError naming the model field a TP / EP size does not divide."""
    tp, ep, moe_tp = layout.tp, layout.ep, layout.moe_tp
    checks = [("num_attention_heads", args.num_attention_heads, tp, "tensor_parallel_size"),
              ("vocab_size", args.vocab_size, tp, "tensor_parallel_size")]
    kv = args.num_key_value_heads
    if kv % tp and tp % kv:  # tp > kv heads: each KV head is replicated on tp / kv ranks
        raise ValueError(f"cannot shard the model: tensor_parallel_size={tp} and num_key_value_heads={kv} "
                         "must divide one another")
    dense = [i for i in range(args.num_hidden_layers) if not args.is_moe_layer(i)]
    if dense:
        checks.append(("intermediate_size", args.intermediate_size, tp, "tensor_parallel_size"))
    if args.num_experts > 0:
        checks.append(("num_experts", args.num_experts, ep, "expert_parallel_size"))
        checks.append(("moe_intermediate_size", args.moe_intermediate_size, moe_tp,
                       f"the engine group's {moe_tp} ranks per expert (max(TP, EP) / EP)"))
    elif ep > 1:
        raise ValueError(f"expert_parallel_size={ep} but {args.architecture} has no MoE layers")
    for field_name, value, ways, what in checks:
        if value % ways:
            raise ValueError(f"cannot shard the model: {what}={ways} does not divide {field_name}={value}")


@dataclass
class ParallelState:
    """The groups a model and its runner use. Built by `init_parallel`; `single()` for one process.

    tp: attention heads, dense MLP, vocabulary. moe: the MoE layers' collective (all-reduce or
    all_to_all) over the engine group. dp: ranks with their own requests (alltoall mode).
    replica: ranks that run the same requests and must sample the same tokens.
    """

    layout: EngineLayout
    engine: ParallelGroup
    tp: ParallelGroup
    moe: ParallelGroup
    dp: ParallelGroup
    replica: ParallelGroup
    debug_checks: bool = False

    @property
    def is_parallel(self) -> bool:
        return self.engine.size > 1

    @property
    def ep_mode(self) -> str | None:
        """None when the MoE layers need no collective."""
        return self.layout.mode if self.moe.size > 1 else None

    @staticmethod
    def single() -> "ParallelState":
        one = ParallelGroup("single")
        return ParallelState(EngineLayout(1, 1, "allreduce", 1, 0), one, one, one, one, one)

    @staticmethod
    def unconnected(tp: int = 1, ep: int = 1, mode: str = "allreduce", rank: int = 0) -> "ParallelState":
        """The shapes of rank `rank` without any process group: builds sharded models (tests,
        shape checks); calling a collective on it fails."""
        layout = EngineLayout.build(tp, ep, mode, rank)
        fake = _unconnected
        return ParallelState(layout, fake("engine", layout.world, rank),
                             fake("tp", layout.tp, layout.tp_rank), fake("moe", layout.world, rank),
                             fake("dp", layout.dp, rank if layout.dp > 1 else 0),
                             fake("replica", 1 if layout.dp > 1 else layout.world, 0 if layout.dp > 1 else rank))

    def check_same(self, x: torch.Tensor, what: str) -> None:
        """Debug: raise unless every replica rank holds the same x."""
        if self.replica.size == 1:
            return
        gathered = self.replica.all_gather(x.reshape(1, -1), dim=0)
        if not (gathered == gathered[:1]).all():
            raise RuntimeError(f"atom.distributed: ranks of one engine diverged: {what} differ across "
                               f"ranks {list(self.replica.ranks)}: {gathered.tolist()}")


def _unconnected(name: str, size: int, rank: int) -> ParallelGroup:
    return ParallelGroup(f"{name} (unconnected)", None, size, rank)


def set_engine_group(group: Any) -> None:
    """Use this process group (size W = the engine's ranks) for the next engines built in this
    process instead of carving engine groups out of the default group. None: back to the default."""
    global _ENGINE_GROUP
    _ENGINE_GROUP = group


_CREATED_GROUPS: list = []       # subgroups atom made (destroyed at exit)
_CREATED_DEFAULT_GROUP = False    # whether atom initialised the default group itself


def _destroy_groups_at_exit() -> None:
    """Join the groups' threads before interpreter teardown: left to static destructors, gloo
    groups abort the process now and then ("terminate called without an active exception")."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    if _CREATED_DEFAULT_GROUP:
        dist.destroy_process_group()  # all groups
        return
    for pg in _CREATED_GROUPS:
        try:
            dist.destroy_process_group(pg)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _new_group(dist, ranks: list[int], timeout: datetime.timedelta):
    # Local synchronisation: only the members call it, so a trainer may host engines on some ranks only.
    pg = dist.new_group(ranks, timeout=timeout, use_local_synchronization=True)
    if not _CREATED_GROUPS and not _CREATED_DEFAULT_GROUP:
        atexit.register(_destroy_groups_at_exit)
    _CREATED_GROUPS.append(pg)
    return pg


def _init_default_group(dist, device: torch.device, timeout: datetime.timedelta) -> None:
    """From torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT[, LOCAL_RANK])."""
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            "tensor/expert parallelism needs torch.distributed: launch the processes with torchrun "
            f"(environment variables {missing} are not set) or call torch.distributed.init_process_group "
            "before building the engine")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and device.index is None:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    global _CREATED_DEFAULT_GROUP
    try:
        dist.init_process_group(backend, timeout=timeout)
        if not _CREATED_GROUPS:
            atexit.register(_destroy_groups_at_exit)
        _CREATED_DEFAULT_GROUP = True
    except Exception as e:  # noqa: BLE001
        raise CollectiveError(
            f"atom.distributed: start-up of the {os.environ['WORLD_SIZE']}-rank group failed on rank "
            f"{os.environ['RANK']} (timeout {timeout.total_seconds()}s): {e}. A rank probably failed "
            "before joining.") from e


def init_parallel(config, args) -> ParallelState:
    """The ParallelState of this process for `config`; TP = EP = 1 returns `single()` at once."""
    tp, ep, mode = config.tensor_parallel_size, config.expert_parallel_size, config.ep_mode
    if tp == 1 and ep == 1:
        return ParallelState.single()
    import torch.distributed as dist

    layout0 = EngineLayout.build(tp, ep, mode)
    check_shardable(args, layout0)
    W = layout0.world
    timeout = datetime.timedelta(seconds=config.dist_timeout_s)
    device = config.torch_device()
    if not dist.is_initialized():
        _init_default_group(dist, device, timeout)
    if _ENGINE_GROUP is not None:
        base = _ENGINE_GROUP
        granks = tuple(dist.get_process_group_ranks(base))
        if len(granks) != W:
            raise ValueError(f"set_engine_group: the group has {len(granks)} ranks; tensor_parallel_size={tp}, "
                             f"expert_parallel_size={ep}, ep_mode={mode!r} need {W}")
    else:
        world, me = dist.get_world_size(), dist.get_rank()
        if world % W:
            raise ValueError(f"the default process group has {world} ranks, not a multiple of the {W} ranks "
                             f"one engine needs (tensor_parallel_size={tp}, expert_parallel_size={ep}, "
                             f"ep_mode={mode!r})")
        lo = me - me % W
        granks = tuple(range(lo, lo + W))
        base = None
    me = dist.get_rank()
    if me not in granks:
        raise ValueError(f"set_engine_group: this process (global rank {me}) is not in the group {list(granks)}")
    rank = granks.index(me)
    layout = EngineLayout.build(tp, ep, mode, rank)
    try:
        # Our own group even when it spans the default one: it carries our timeout.
        engine_pg = _new_group(dist, list(granks), timeout) if base is None else base
        if tp == W:
            tp_pg, tp_ranks = engine_pg, granks
        elif tp == 1:
            tp_pg, tp_ranks = None, (me,)
        else:
            tp_ranks = tuple(granks[r] for r in layout.tp_ranks)
            tp_pg = _new_group(dist, list(tp_ranks), timeout)
    except Exception as e:  # noqa: BLE001
        raise CollectiveError(f"atom.distributed: creating the process groups of engine ranks {list(granks)} "
                              f"failed on global rank {me} (timeout {config.dist_timeout_s}s): {e}") from e
    t = config.dist_timeout_s
    engine = ParallelGroup("engine", engine_pg, W, rank, t, granks)
    tp_group = ParallelGroup("tensor-parallel", tp_pg, tp, layout.tp_rank, t, tp_ranks)
    if args.num_experts > 0 and W > 1:
        moe = ParallelGroup(f"expert-parallel ({layout.mode})", engine_pg, W, rank, t, granks)
    else:
        moe = ParallelGroup("expert-parallel (unused)")
    if layout.dp > 1:
        dp = ParallelGroup("data-parallel", engine_pg, W, rank, t, granks)
        replica = ParallelGroup("replica")
    else:
        dp, replica = ParallelGroup("data-parallel (unused)"), engine
    state = ParallelState(layout, engine, tp_group, moe, dp, replica, debug_checks=DEBUG_SYNC_CHECKS)
    _handshake(state, config, args, device)
    return state


def _handshake(state: ParallelState, config, args, device: torch.device) -> None:
    """All ranks must agree on the engine's shape; also the first collective: a rank that failed
    before it makes the others raise here within the timeout."""
    mine = (config.tensor_parallel_size, config.expert_parallel_size, config.ep_mode, args.architecture,
            args.vocab_size, args.hidden_size, args.num_hidden_layers, args.num_experts, config.kv_block_size,
            config.max_num_seqs, config.max_num_batched_tokens, config.enable_prefix_caching)
    everyone = state.engine.all_gather_object(mine)
    if any(other != mine for other in everyone):
        raise ValueError("atom.distributed: the ranks of one engine were built with different settings "
                         "(tensor_parallel_size, expert_parallel_size, ep_mode, model shape, kv_block_size, "
                         f"max_num_seqs, max_num_batched_tokens, enable_prefix_caching): {everyone}")
