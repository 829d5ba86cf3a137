"""The fused MoE's tile table (atom/ops/moe_tiles.py), plain Python on the CPU: a shape in the
table gets its own ladder, any other shape the default one; the ladder's token bounds are
inclusive; a tuned JSON (bench/moe_tune.py's "moe_shapes") round-trips through apply_tuned."""
from __future__ import annotations

import json

import pytest
import torch

from atom.ops import moe_tiles
from atom.ops.moe_tiles import DEFAULT_LADDER, TOP, MoeShape, moe_configs, shape_of, tiles

GPT_OSS = MoeShape(32, 5760, 2880, 2, "NVIDIA H200")
MOONLIGHT = MoeShape(64, 2816, 2048, 2, "NVIDIA H200")
UP = tiles(128, 64, 128, 1, 8, 3)
DOWN = tiles(128, 128, 128, 1, 8, 3)
UP_1 = tiles(16, 64, 64, 1, 4, 5)
DOWN_1 = tiles(16, 128, 64, 1, 4, 5)


@pytest.fixture(autouse=True)
def clean_table():
    """Each test starts from an empty table (the shipped MEASURED entries are the shapes these
    tests install) and the default ladder, and leaves both as found."""
    saved_table, saved_ladder = dict(moe_tiles.TABLE), list(DEFAULT_LADDER)
    moe_tiles.TABLE.clear()
    yield saved_table
    moe_tiles.TABLE.clear()
    moe_tiles.TABLE.update(saved_table)
    DEFAULT_LADDER[:] = saved_ladder


def test_shipped_measurements_are_in_the_table_and_well_formed(clean_table):
    """MEASURED (the H200's tuned GPT-OSS-20B / Moonlight ladders) is what TABLE holds at import: a
    model of that shape gets its configs with no --tuned file; ladders ascend, end at TOP, keep the
    default's untuned rungs and pair configs of one BLOCK_M."""
    shipped = clean_table  # TABLE as imported
    assert set(shipped) == set(moe_tiles.MEASURED) == {GPT_OSS, MOONLIGHT}
    for shape, entry in moe_tiles.MEASURED.items():
        bounds = [b for b, _, _ in entry.ladder]
        assert bounds == sorted(set(bounds)) and bounds[-1] == TOP, shape
        assert {b for b, _, _ in DEFAULT_LADDER} <= set(bounds), shape
        assert all(up["BLOCK_M"] == down["BLOCK_M"] for _, up, down in entry.ladder)
        assert shipped[shape].ladder == entry.ladder and shipped[shape].ladder is not entry.ladder
    moe_tiles.TABLE.update(shipped)
    assert moe_configs(512, GPT_OSS) == (tiles(64, 64, 64, 1, 4, 3), tiles(64, 128, 64, 1, 4, 3))
    assert moe_configs(8192, GPT_OSS) == (tiles(128, 64, 64, 8, 8, 3), tiles(128, 256, 64, 8, 8, 3))
    assert moe_configs(8192) != moe_configs(8192, GPT_OSS)
    assert moe_tiles.small_configs(GPT_OSS, {})["down"]["BLOCK_K"] == 256
    assert moe_tiles.small_configs(MOONLIGHT, {"default": 1}) == {"default": 1}


def test_default_ladder_is_the_qwen3_one_and_unknown_shapes_use_it():
    # The literal configs the token-count-only table had before shapes existed (no speed change
    # for grpo-moe): decode at 512 tokens, T=1 and a prefill chunk.
    assert moe_configs(512) == (tiles(64, 64, 64, 1, 4, 3), tiles(64, 128, 64, 1, 4, 3))
    assert moe_configs(1) == (tiles(16, 32, 128, 1, 4, 4), tiles(16, 64, 128, 1, 4, 4))
    assert moe_configs(8192) == (tiles(128, 64, 64, 8, 8, 4), tiles(128, 128, 64, 8, 8, 4))
    qwen3 = MoeShape(128, 1536, 2048, 2, "NVIDIA H200")
    for t in (1, 2, 8, 9, 256, 257, 1024, 1025, 1 << 20):
        assert moe_configs(t, qwen3) == moe_configs(t) == moe_configs(t, None)


def test_exact_shape_hit_and_every_other_key_field_misses():
    moe_tiles.install(GPT_OSS, 1024, UP, DOWN)
    assert moe_configs(512, GPT_OSS) == (UP, DOWN)
    default = moe_configs(512)
    assert default != (UP, DOWN)
    for other in (MoeShape(16, 5760, 2880, 2, "NVIDIA H200"), MoeShape(32, 2880, 2880, 2, "NVIDIA H200"),
                  MoeShape(32, 5760, 2048, 2, "NVIDIA H200"), MoeShape(32, 5760, 2880, 4, "NVIDIA H200"),
                  MoeShape(32, 5760, 2880, 2, "NVIDIA H100 80GB HBM3"), MOONLIGHT):
        assert moe_configs(512, other) == default, other


def test_ladder_boundaries_are_inclusive_and_untuned_rungs_keep_the_default():
    moe_tiles.install(GPT_OSS, 1, UP_1, DOWN_1)
    moe_tiles.install(GPT_OSS, 1024, UP, DOWN)
    assert moe_configs(1, GPT_OSS) == (UP_1, DOWN_1)
    for t in (2, 8, 9, 256):  # rungs 8, 32, 128, 256: the default's
        assert moe_configs(t, GPT_OSS) == moe_configs(t)
    for t in (257, 512, 1024):
        assert moe_configs(t, GPT_OSS) == (UP, DOWN)
    assert moe_configs(1025, GPT_OSS) == moe_configs(1025) == (DEFAULT_LADDER[-1][1], DEFAULT_LADDER[-1][2])
    assert [b for b, _, _ in moe_tiles.TABLE[GPT_OSS].ladder] == [b for b, _, _ in DEFAULT_LADDER]


def test_a_new_bound_is_inserted_in_order_and_the_top_rung_serves_any_count():
    moe_tiles.install(MOONLIGHT, 600, UP, DOWN)
    moe_tiles.install(MOONLIGHT, TOP, UP_1, DOWN_1)
    bounds = [b for b, _, _ in moe_tiles.TABLE[MOONLIGHT].ladder]
    assert bounds == sorted(bounds) and 600 in bounds and bounds[-1] == TOP
    assert moe_configs(600, MOONLIGHT) == (UP, DOWN)
    assert moe_configs(601, MOONLIGHT) == moe_configs(601)  # the default's 1024 rung
    assert moe_configs(1 << 40, MOONLIGHT) == (UP_1, DOWN_1)
    assert moe_configs(1 << 63, MOONLIGHT) == (UP_1, DOWN_1)  # beyond every bound: the last rung


def test_install_rejects_mismatched_block_m_and_bad_bounds():
    with pytest.raises(ValueError, match="BLOCK_M"):
        moe_tiles.install(GPT_OSS, 1024, UP, tiles(64, 128, 64, 1, 4, 3))
    with pytest.raises(ValueError, match="bound"):
        moe_tiles.install(GPT_OSS, 0, UP, DOWN)
    with pytest.raises(ValueError, match="'up' and 'down'"):
        moe_tiles.install_small(GPT_OSS, {"up": {}})
    assert GPT_OSS not in moe_tiles.TABLE


def test_small_path_configs_by_shape():
    default = {"up": {"BLOCK_N": 32}, "down": {"BLOCK_N": 8}}
    mine = {"up": dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
            "down": dict(BLOCK_N=16, BLOCK_K=256, num_warps=8, num_stages=2)}
    moe_tiles.install_small(GPT_OSS, mine)
    assert moe_tiles.small_configs(GPT_OSS, default) == mine
    assert moe_tiles.small_configs(MOONLIGHT, default) is default
    assert moe_tiles.small_configs(None, default) is default
    assert moe_configs(512, GPT_OSS) == moe_configs(512)  # a small-only entry keeps the default ladder


def test_shape_of_reads_the_stacked_gate_up_weight():
    w13 = torch.empty(4, 2 * 40, 48, dtype=torch.bfloat16)
    assert shape_of(w13) == MoeShape(4, 80, 48, 2, "cpu")
    assert shape_of(w13.float()).dtype_size == 4


def test_tuned_json_round_trip_through_apply_tuned(tmp_path):
    from bench.kernels import apply_tuned
    small = {"up": dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
             "down": dict(BLOCK_N=16, BLOCK_K=256, num_warps=8, num_stages=2)}
    legacy_up, legacy_down = tiles(32, 64, 128, 8, 4, 3), tiles(32, 128, 128, 8, 4, 3)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({
        "moe": [[1024, legacy_up, legacy_down]],  # bench.kernels --tune: the default ladder
        "moe_shapes": [moe_tiles.to_json(GPT_OSS, [(1024, UP, DOWN), (TOP, UP_1, DOWN_1)], small)]}))
    apply_tuned(str(path))
    assert moe_configs(512) == (legacy_up, legacy_down)
    assert moe_configs(512, GPT_OSS) == (UP, DOWN)
    assert moe_configs(8192, GPT_OSS) == (UP_1, DOWN_1)
    assert moe_tiles.small_configs(GPT_OSS, {}) == small
    assert moe_configs(512, MOONLIGHT) == (legacy_up, legacy_down)
