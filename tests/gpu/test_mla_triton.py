"""The Triton MLA ops (atom/ops/triton/mla.py) against their torch references
(atom/ops/torch_family_ops.py) on fresh random inputs: the latent cache write, and the absorbed
decode in split and whole-own-part modes, with and without shared-prefix groups (the n samples of
a prompt read its latents once per group). Small shapes run in Triton's interpreter
(ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1); the GPU adds Moonlight's and DeepSeek-V3's."""
from __future__ import annotations

import math
import random

import pytest
import torch

from atom.ops import torch_family_ops
from atom.ops.metadata import AttentionMetadata, CascadeMetadata

from gpu_helpers import ON_CPU, act_dtypes, device, triton_ops  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 2e-5}

# (heads, kv_lora_rank, qk_rope_head_dim, page): the tiny test model; dims that are not powers of
# two with two head blocks; a mid size.
SHAPES = [(4, 32, 8, 16), (20, 48, 24, 16), (16, 64, 16, 32)]
if not ON_CPU:  # Moonlight-16B-A3B, its TP2 share, DeepSeek-V3 on one GPU
    SHAPES += [(16, 512, 64, 16), (8, 512, 64, 16), (128, 512, 64, 16)]


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "non-finite output"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < TOL[dtype], f"relative error {err:.3g} over {TOL[dtype]:.3g}"


def latent_batch(device, dtype, seq_lens, heads, lat, rope, page, shared=None):
    """Random latent cache rows, shuffled block tables and absorbed queries for one decode step.
    shared: (rows, prefix_blocks) pairs: those rows share their first prefix_blocks blocks."""
    need = [math.ceil(n / page) for n in seq_lens]
    total = sum(need) + 3
    perm = torch.randperm(total).tolist()
    tables = [[perm.pop() for _ in range(n)] for n in need]
    for rows, nb in shared or []:
        for r in rows[1:]:
            tables[r][:nb] = tables[rows[0]][:nb]
    width = max(need)
    bsz = len(seq_lens)
    meta = AttentionMetadata(
        slot_mapping=torch.full((bsz,), -1, device=device),
        query_start_loc=torch.arange(bsz + 1, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        is_decode=True, max_query_len=1, max_seq_len=max(seq_lens))
    cache = torch.randn(total, page, 1, lat + rope, device=device).to(dtype)
    # q_pe as the model passes it: a strided view of a wider tensor.
    q = torch.randn(bsz, heads, lat + rope, device=device)
    q_latent, q_pe = (0.5 * q[..., :lat]).to(dtype), q[..., lat:].to(dtype)
    return q_latent, q_pe, cache, meta, 2 * (lat + rope) ** -0.5


@pytest.fixture(params=["split", "whole", "split+reuse_kv", "whole+reuse_kv"])
def decode_mode(request, triton_ops, monkeypatch):
    """Split own parts + merge kernel, or one program per sequence's whole own part; with
    reuse_kv, one load of each latent tile serves scores and values (own part below 64 latent
    columns, and prefix programs whose value chunk is the whole latent). From 64 columns on the
    own part holds its latent in four column chunks (48 pads to 64, its last chunk all masked),
    below in one (32)."""
    import atom.ops.triton.mla as mla
    reuse = request.param not in ("split", "whole")
    monkeypatch.setitem(mla.MLA_CFG, "whole_own_pairs", 1 if request.param.startswith("whole") else 1 << 40)
    monkeypatch.setitem(mla.MLA_CFG, "reuse_kv", reuse)
    monkeypatch.setitem(mla.MLA_CFG, "prefix_reuse_kv", reuse)
    if ON_CPU:  # several own splits at the interpreter's short sequences
        monkeypatch.setitem(mla.MLA_CFG, "small_split", 16)
        monkeypatch.setitem(mla.MLA_CFG, "split", 32)
    return request.param


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("lat,rope,page", [(32, 8, 16), (48, 24, 32), (512, 64, 16)])
def test_mla_cache_write(triton_ops, device, dtype, lat, rope, page):
    torch.manual_seed(lat + page)
    blocks, t = 12, 40
    cache = torch.randn(blocks, page, 1, lat + rope, device=device).to(dtype)
    latent = torch.randn(t, lat, device=device).to(dtype)
    k_pe = torch.randn(t, 3, rope, device=device).to(dtype)[:, 1]  # strided, as rope's output slice
    slots = torch.randperm(blocks * page, device=device)[:t]
    slots[::6] = -1
    got, want = cache.clone(), cache.clone()
    triton_ops("mla_cache_write")["triton"](latent, k_pe, got, slots)
    torch_family_ops.mla_cache_write(latent, k_pe, want, slots)
    assert torch.equal(got, want)
    assert not torch.equal(got, cache)


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("heads,lat,rope,page", SHAPES)
def test_mla_decode(triton_ops, device, dtype, heads, lat, rope, page, decode_mode):
    torch.manual_seed(heads * 7 + lat + page)
    seq_lens = [1, 2, 17, 70, 33] if ON_CPU else [1, 2, 17, 300, 1025, 4097, 2048, 513]
    q_latent, q_pe, cache, meta, scale = latent_batch(device, dtype, seq_lens, heads, lat, rope, page)
    out = triton_ops("mla_attention_decode")["triton"](q_latent, q_pe, cache, meta, scale)
    check(out, torch_family_ops.mla_attention_decode(q_latent, q_pe, cache, meta, scale), dtype)


@pytest.fixture(params=["small_prefix_split", "prefix_split+value_chunks", "groups_of_8", "two_pass",
                        "two_pass+partial_tile", "two_pass+8_heads+partial_tile"])
def prefix_cfg(request, triton_ops, monkeypatch):
    """Shared-prefix splits of either size class; the second also cuts the latent output into
    chunks (CPU: 16 columns, GPU: 128) so that several value-chunk programs share a group; the
    third forms groups of 8 samples (prefix_group, the decode runner's size through
    cascade_group_rows) over head blocks of 8; the fourth runs those groups through the two-pass
    prefix (scores kernel, then values kernel)."""
    import atom.ops.triton.mla as mla
    small = request.param == "small_prefix_split"
    monkeypatch.setitem(mla.MLA_CFG, "small_prefix_pairs", 1 << 40 if small else 1)
    if request.param == "prefix_split+value_chunks":
        monkeypatch.setitem(mla.MLA_CFG, "prefix_dv", 16 if ON_CPU else 128)
    # several head blocks for >8 heads, except in the small-prefix case (one block of 16)
    monkeypatch.setitem(mla.MLA_CFG, "prefix_heads", 16 if small else 8)
    # groups of 8 are the default since session 12; the other two keep the generic rule's groups
    two_pass = request.param.startswith("two_pass")
    monkeypatch.setitem(mla.MLA_CFG, "prefix_group", 8 if request.param == "groups_of_8" or two_pass else None)
    # the two-pass prefix is the default since session 13; the first three run the one-pass kernel
    monkeypatch.setitem(mla.MLA_CFG, "prefix_two_pass", two_pass)
    # the last: two-pass row blocks of 8 heads (20 heads: blocks of 8, 8 and 4)
    monkeypatch.setitem(mla.MLA_CFG, "two_pass_heads", 8 if "8_heads" in request.param else 16)
    # scores, then values: 2+ value chunks; on the CPU 2 tiles per split, or whole tiles with
    # prefixes ending mid-tile
    if two_pass:
        partial = "partial_tile" in request.param
        # the partial-tile cases also step the values kernel through half score tiles
        if ON_CPU:  # the partial-tile cases take their tile through the wide-batch rule
            monkeypatch.setitem(mla.MLA_CFG, "two_pass_tile", 16)
            monkeypatch.setitem(mla.MLA_CFG, "two_pass_wide_tile", 32)
            monkeypatch.setitem(mla.MLA_CFG, "two_pass_wide_rows", 1 if partial else 1 << 40)
            monkeypatch.setitem(mla.MLA_CFG, "two_pass_value_tile", 16)
            monkeypatch.setitem(mla.MLA_CFG, "two_pass_dv", 16)
        elif partial:
            monkeypatch.setitem(mla.MLA_CFG, "two_pass_wide_rows", 1)  # the default wide tile (128)
            monkeypatch.setitem(mla.MLA_CFG, "two_pass_value_tile", 64)
    if ON_CPU:
        monkeypatch.setitem(mla.MLA_CFG, "small_prefix_split", 16)
        monkeypatch.setitem(mla.MLA_CFG, "prefix_split", 32)
    return request.param


# Open bug (sessions 8-9, H200): at 20 heads with L = 48 / R = 24 (a head block only partly
# filled, latent and rope widths padded to 64 / 32, groups of 3 members in a 64-row tile) the
# shared-prefix program gives a relative error of 0.319 on the GPU in bf16 when it loads the
# latent tile twice (prefix_reuse_kv off, the small-prefix split; session 9 ran each of the 30
# cases of this shape in its own launch-blocking process: those 4 fail, the 26 others pass, the
# default one-load path included). compute-sanitizer found no bad access in session 8, yet a
# run of the whole file hit an illegal address right after these cases (session 9), so on the
# GPU those four stop as expected failures before they launch anything: they would poison the
# CUDA context of every later test.
# Triton's interpreter computes them right, and every model shape (16, 8 and 128 heads at
# 512 / 64) passes. Compiled for sm_90 (session 9, on the CPU), this shape's cache rows of
# 72 elements are not 16-byte divisible, so its tiles load element by element into shared
# memory without cp.async; a model row (576 = 512 + 64) takes the vectorized cp.async path.
# The failing two-load program and the passing one-load program both take the unvectorized
# path, and their PTX has the barrier / fence / wgmma-wait sequence one expects around every
# tile. Next on a GPU: the same case at prefix_warps 4 (one warpgroup).
_CASCADE_GPU_BUG = (20, 48, 24, 16)


@pytest.mark.parametrize("dtype", act_dtypes())
@pytest.mark.parametrize("heads,lat,rope,page", SHAPES)
def test_mla_cascade_decode(triton_ops, device, dtype, heads, lat, rope, page, decode_mode, prefix_cfg):
    """Two prompts of n samples sharing their prompt's blocks, groups of at most max_n rows (the
    decode runner's size, cascade_group_rows), a row of its own, a padded row (zeros)."""
    if (not ON_CPU and (heads, lat, rope, page) == _CASCADE_GPU_BUG and dtype == torch.bfloat16
            and prefix_cfg in ("small_prefix_split", "groups_of_8") and not decode_mode.endswith("reuse_kv")):
        pytest.xfail("open bug: MLA cascade at 20 heads, L 48, R 24 in bf16 with the two-load prefix tile "
                     "(wrong on the GPU, once an illegal address)")
    torch.manual_seed(heads * 13 + lat + page)
    random.seed(heads)
    partial_tile = "partial_tile" in prefix_cfg  # a prefix of 2.5 tiles (bf16; 5 tiles in float32)
    prompt = (88 if partial_tile else 40) if ON_CPU else (1088 if partial_tile else 1024)
    n = 3 if ON_CPU and prefix_cfg in ("small_prefix_split", "prefix_split+value_chunks") else 8
    seq_lens = [prompt + random.randint(1, 70 if ON_CPU else 900) for _ in range(2 * n + 2)]
    nb = prompt // page
    groups = [list(range(0, n)), list(range(n, 2 * n))]
    q_latent, q_pe, cache, meta, scale = latent_batch(device, dtype, seq_lens, heads, lat, rope, page,
                                                      shared=[(g, nb) for g in groups])
    import atom.ops.triton.mla as mla
    max_n = mla.cascade_group_rows("mla_attention_decode", heads)  # the decode runner's size
    assert max_n == 8 if prefix_cfg not in ("small_prefix_split", "prefix_split+value_chunks") else max_n == max(2, min(16, 64 // heads))
    rows = [g[i:i + max_n] for g in groups for i in range(0, len(g), max_n)]
    cap = len(seq_lens) // 2
    grid_rows = torch.full((cap, max_n), -1, dtype=torch.int32)
    plen = torch.zeros(cap, dtype=torch.int32)
    row_prefix = torch.zeros(len(seq_lens), dtype=torch.int32)
    for gi, members in enumerate(rows):
        grid_rows[gi, :len(members)] = torch.tensor(members, dtype=torch.int32)
        plen[gi] = nb * page
        row_prefix[members] = nb * page
    meta.cascade = CascadeMetadata(grid_rows.to(device), plen.to(device), row_prefix.to(device), meta.max_seq_len)
    tri = triton_ops("mla_attention_decode")["triton"]
    out = tri(q_latent, q_pe, cache, meta, scale)
    check(out, torch_family_ops.mla_attention_decode(q_latent, q_pe, cache, meta, scale), dtype)
    meta.seq_lens[-1] = 0  # a padded row of a CUDA-graph batch: zeros, never NaN
    out = tri(q_latent, q_pe, cache, meta, scale)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


def test_two_pass_prefix_tiles_divide_the_split_and_bound_the_scratch(triton_ops):
    """The two-pass prefix's tile: cfg's size cut to divide the split (its value programs sum
    whole tiles), float32 halving it; the one-pass kernel (0) below tl.dot's 16 tokens or when
    the p scratch would pass MAX_SCRATCH_BYTES (the KV budget does not count it)."""
    import atom.ops.triton.mla as mla
    from atom.ops.triton import mla_two_pass as two_pass
    cfg = dict(mla.MLA_CFG, prefix_two_pass=True, two_pass_tile=64, two_pass_heads=16, two_pass_wide_tile=128,
               two_pass_wide_rows=4096)
    assert two_pass.tile_tokens(cfg, 1, 1024, 16, 256, 8, 2048, 512) == 128  # Moonlight, bs512 graph: 134 MB
    assert two_pass.tile_tokens(cfg, 1, 1024, 16, 32, 8, 2048, 64) == 64  # bs64: 64-token tiles (more programs)
    assert two_pass.tile_tokens(cfg, 2, 1024, 16, 256, 8, 1024, 512) == 64  # float32: half the tokens, same bytes
    assert two_pass.tile_tokens(cfg, 1, 32, 16, 4, 8, 100, 8) == 32
    assert two_pass.tile_tokens(cfg, 1, 8, 16, 4, 8, 100, 8) == 0
    assert two_pass.tile_tokens(cfg, 1, 1024, 128, 256, 8, 2048, 512) == 0  # 1 GB at 128 heads: one pass
    assert two_pass.tile_tokens(cfg, 1, 1024, 128, 32, 8, 2048, 64) == 128  # 134 MB


def test_deepseek_decode_ops_are_graph_safe_on_cuda(triton_ops):
    """The decode runner captures CUDA graphs only when every op a decode step runs is graph_safe
    (atom/engine/cuda_graph.py): on CUDA, DeepSeek-V3's (MLA and the grouped routing on triton)
    all are, and its decode attention reads shared-prefix groups."""
    from atom.engine.cuda_graph import _GRAPH_OPS, _GRAPH_OPS_MOE
    from atom.models.deepseek_v3 import DeepseekV3ForCausalLM
    from atom.ops.registry import OpTable
    table = OpTable()
    table.configure(torch.device("cuda"))  # the registry's choice for a CUDA device (no device needed)
    needed = _GRAPH_OPS + _GRAPH_OPS_MOE + DeepseekV3ForCausalLM.graph_ops
    assert {table.backend_of[name] for name in ("mla_attention_decode", "mla_cache_write", "moe_route_grouped")} \
        == {"triton"}
    assert [name for name in needed if not table.supports(name, "graph_safe")] == []
    assert table.supports(DeepseekV3ForCausalLM.decode_attention_op, "cascade")
    # Prefill is never captured; its triton op (expansion + flash) reads the host's query lengths.
    assert table.backend_of["mla_attention_prefill"] == "triton"
