"""Tile configs of the Triton fused MoE, by expert shape and token count.

The grouped GEMMs of atom/ops/triton/moe.py (and the small-batch kernels of moe_small.py) take
their tiles from here. A table keyed by `MoeShape` (number of experts, N = 2 * intermediate of
the gate|up weight, K = hidden, bytes per weight element, device name) holds a token-count
ladder per shape; a shape not in the table gets `DEFAULT_LADDER`, the configs tuned for
Qwen3-30B-A3B (E=128, H=2048, I=768) that every shape used before. Entries come from
`python -m bench.moe_tune FILE` (installed by `bench.kernels.apply_tuned`) or, once measured on
a device, from `MEASURED` below.

No Triton import here: the lookup is plain Python (tests/test_moe_tiles.py runs it on the CPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atom.ops.device import device_name

# A rung of a ladder: (largest token count it serves, gate|up GEMM config, down GEMM config).
# BLOCK_N of the gate|up config counts each of the gate and up tiles; both GEMMs share BLOCK_M
# (one alignment of the pairs serves both).
Rung = tuple[int, dict, dict]
TOP = 1 << 62  # the bound of a ladder's last rung


def tiles(bm: int, bn: int, bk: int, gm: int, warps: int, stages: int) -> dict:
    """One grouped-GEMM tile config."""
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)


# Started from published H200 configs for E=128, I=768, swept on the H200 at T=1 and T=512
# (2026-11-29: T=1 31 us, T=512 332 us per layer, 83% of the copy bandwidth for the 1.2 GB of
# Qwen3-30B-A3B's expert weights). A list: bench.kernels.apply_tuned's legacy "moe" key edits it.
DEFAULT_LADDER: list[Rung] = [
    (1, tiles(16, 32, 128, 1, 4, 4), tiles(16, 64, 128, 1, 4, 4)),
    (8, tiles(16, 32, 128, 1, 4, 3), tiles(16, 64, 128, 1, 4, 3)),
    (32, tiles(16, 32, 128, 1, 4, 3), tiles(16, 64, 128, 1, 4, 3)),
    (128, tiles(16, 64, 128, 1, 4, 3), tiles(16, 128, 128, 1, 4, 3)),
    (256, tiles(32, 64, 128, 8, 4, 3), tiles(32, 128, 128, 8, 4, 3)),
    (1024, tiles(64, 64, 64, 1, 4, 3), tiles(64, 128, 64, 1, 4, 3)),
    (TOP, tiles(128, 64, 64, 8, 8, 4), tiles(128, 128, 64, 8, 8, 4)),
]


@dataclass(frozen=True)
class MoeShape:
    """What a tile choice depends on besides the token count."""

    experts: int
    n: int  # rows of one expert's gate|up weight: 2 * intermediate
    k: int  # hidden size
    dtype_size: int  # bytes per weight element
    device: str  # torch.cuda.get_device_name(), "cpu" for CPU tensors


@dataclass
class ShapeTiles:
    """One shape's configs: the aligned path's token-count ladder and, optionally, the small
    path's {"up": ..., "down": ...} (moe_small.SMALL_CFG's layout; None: SMALL_CFG)."""

    ladder: list[Rung] = field(default_factory=list)
    small: dict | None = None


def with_rung(ladder: list[Rung], bound: int, up: dict, down: dict) -> list[Rung]:
    """`ladder` (DEFAULT_LADDER when empty) with the rung (bound, up, down): a rung with the same
    bound is replaced, a new bound is inserted in order."""
    if up["BLOCK_M"] != down["BLOCK_M"]:
        raise ValueError(f"MoE tiles: the gate|up and down configs must share BLOCK_M, got {up} / {down}")
    if bound < 1:
        raise ValueError(f"MoE tiles: a rung's token bound must be >= 1, got {bound}")
    rungs = [r for r in (ladder or DEFAULT_LADDER) if r[0] != bound] + [(bound, dict(up), dict(down))]
    return sorted(rungs, key=lambda r: r[0])


def _measured(rungs: list[Rung], small: dict | None = None) -> ShapeTiles:
    ladder: list[Rung] = []
    for bound, up, down in rungs:
        ladder = with_rung(ladder, bound, up, down)
    return ShapeTiles(ladder, small)


# Configs measured on a device (`python -m bench.moe_tune`, H200, 2026-12-02, at T = 1 / 512 /
# 8192; rungs it did not measure stay DEFAULT_LADDER's), shipped so no --tuned file is needed.
# grpo-gpt-oss with them: 24,063 tok/s (58.4% of its limit) against 22,018 (53.0%) before.
MEASURED: dict[MoeShape, ShapeTiles] = {
    MoeShape(32, 5760, 2880, 2, "NVIDIA H200"): _measured(  # GPT-OSS-20B
        [(1024, tiles(64, 64, 64, 1, 4, 3), tiles(64, 128, 64, 1, 4, 3)),
         (TOP, tiles(128, 64, 64, 8, 8, 3), tiles(128, 256, 64, 8, 8, 3))],
        small={"up": dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
               "down": dict(BLOCK_N=8, BLOCK_K=256, num_warps=8, num_stages=2)}),
    MoeShape(64, 2816, 2048, 2, "NVIDIA H200"): _measured(  # Moonlight-16B-A3B
        [(1, tiles(16, 32, 128, 1, 4, 4), tiles(16, 64, 128, 1, 4, 4)),
         (1024, tiles(64, 64, 64, 1, 4, 3), tiles(64, 128, 64, 1, 4, 3)),
         (TOP, tiles(128, 64, 64, 8, 8, 3), tiles(128, 256, 64, 8, 8, 3))]),
}
TABLE: dict[MoeShape, ShapeTiles] = {k: ShapeTiles(list(v.ladder), v.small) for k, v in MEASURED.items()}


def shape_of(w13: torch.Tensor) -> MoeShape:
    """The key of the experts whose stacked gate|up weight is w13 [E, 2I, H]."""
    e, n, k = w13.shape
    return MoeShape(e, n, k, w13.element_size(), device_name(w13.device))


def pick(ladder: list[Rung], num_tokens: int) -> tuple[dict, dict]:
    """The (up, down) configs of the first rung whose bound holds num_tokens (the last rung
    beyond every bound)."""
    for bound, up, down in ladder:
        if num_tokens <= bound:
            return up, down
    return ladder[-1][1], ladder[-1][2]


def moe_configs(num_tokens: int, shape: MoeShape | None = None) -> tuple[dict, dict]:
    """(gate|up config, down config) for num_tokens tokens through experts of `shape`: the
    shape's ladder if the table has one, else DEFAULT_LADDER."""
    entry = TABLE.get(shape) if shape is not None else None
    return pick(entry.ladder if entry is not None and entry.ladder else DEFAULT_LADDER, num_tokens)


def small_configs(shape: MoeShape | None, default: dict) -> dict:
    """The small path's {"up", "down"} configs for `shape` (default when the table has none)."""
    entry = TABLE.get(shape) if shape is not None else None
    return entry.small if entry is not None and entry.small is not None else default


def install(shape: MoeShape, bound: int, up: dict, down: dict) -> None:
    """Give `shape` the rung (bound, up, down): its ladder starts as a copy of DEFAULT_LADDER,
    a rung with the same bound is replaced, a new bound is inserted in order."""
    rungs = with_rung(TABLE[shape].ladder if shape in TABLE else [], bound, up, down)
    TABLE.setdefault(shape, ShapeTiles()).ladder = rungs


def install_small(shape: MoeShape, cfg: dict) -> None:
    """Give `shape` the small path's configs {"up": ..., "down": ...}."""
    if set(cfg) != {"up", "down"}:
        raise ValueError(f"MoE small-path tiles need keys 'up' and 'down', got {sorted(cfg)}")
    TABLE.setdefault(shape, ShapeTiles()).small = {"up": dict(cfg["up"]), "down": dict(cfg["down"])}


def to_json(shape: MoeShape, rungs: list[Rung], small: dict | None = None) -> dict:
    """One shape's tuned configs as a JSON object (bench.moe_tune writes a list of them)."""
    out = dict(experts=shape.experts, n=shape.n, k=shape.k, dtype_size=shape.dtype_size, device=shape.device,
               ladder=[[b, u, d] for b, u, d in rungs])
    if small is not None:
        out["small"] = small
    return out


def install_json(entries: list[dict]) -> None:
    """Install to_json objects into the table (bench.kernels.apply_tuned's "moe_shapes")."""
    for item in entries:
        shape = MoeShape(int(item["experts"]), int(item["n"]), int(item["k"]), int(item["dtype_size"]),
                         str(item["device"]))
        for bound, up, down in item.get("ladder", []):
            install(shape, int(bound), up, down)
        if item.get("small") is not None:
            install_small(shape, item["small"])
