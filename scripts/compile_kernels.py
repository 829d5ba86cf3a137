"""Compile (never run) Triton kernels for an H200 (sm_90) on a machine without a GPU: catches
what Triton's interpreter does not (compile errors, shared memory over the limit) before device
time is spent. Families:

* gemm: the batch-invariant GEMM at Qwen3-8B's and the tests' shapes under every config the
  sweep may pick (bench.batch_invariant CANDIDATES) and the rule's own, each launched at four M
  that must compile to the same kernel;
* gpt_oss: the sliding-window / sink attention and biased fused MoE at GPT-OSS-20B's and the tiny
  test model's shapes, of the triton backend and of the batch-invariant one (triton_invariant,
  with its clamped SwiGLU);
* mla: the MLA decode and cache write at Moonlight-16B-A3B's (16 heads, kv_lora_rank 512, rope
  64, pages of 16), its TP2 share's (8 heads), DeepSeek-V3's (128 heads) and the tests' shapes,
  under the default MLA_CFG, the tests' overrides and every candidate `bench/mla_kernels.py
  --tune` can pick (bench.mla_kernels.TUNE_SPACE);
* mla_invariant: DeepSeek-V3's batch-invariant ops (atom/ops/triton/invariant_mla.py): the
  fixed-split MLA decode with its ordered merge (default MLA_CFG and reuse_kv), the absorbed
  prefill, the per-head GEMMs and the grouped routing, at the mla family's shapes;
* sampling: the sampler's one-program and split paths with and without the rank count;
* moe_tune: the fused MoE under every tile config bench/moe_tune.py may install, at GPT-OSS-20B's
  (biased, clamped) and Moonlight-16B-A3B's shapes, bf16 (as swept).

Both in bfloat16 and float32 (moe_tune: bfloat16).

    PYTHONPATH=$PWD:/work/triton_pkgs .venv/bin/python scripts/compile_kernels.py [--only mla] [--regs]

Every kernel launch compiles the launch's exact specialisation down to a cubin (ptxas) and
returns without launching: tensors are CPU tensors whose contents are never read. Prints each
kernel's launches and the largest shared-memory use, and exits non-zero naming every launch over
the limit. Needs Triton (not a dependency of atom); tests/test_compile_kernels.py runs it.
"""
from __future__ import annotations

import argparse
import collections
import itertools

import torch

H200_SHARED = 232448  # bytes of shared memory a block may use on sm_90
DTYPES = (torch.bfloat16, torch.float32)
_where: list[str] = [""]  # what the launches being compiled belong to (for the report)
_hashes: list[str] = []  # each compiled launch's kernel hash, in launch order
_cubins: dict[str, tuple[str, str, bytes]] = {}  # kernel hash -> (name, where, cubin), kept with --regs
_keep_cubins: list[bool] = [False]


def _compile_only() -> list[tuple[str, int, str]]:
    """Make every JIT launch compile for sm_90 and return; returns the list it appends
    (kernel name, shared bytes, what the launch belongs to) to."""
    torch.cuda.is_available = lambda: True  # lets atom.ops.triton import
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class _Sm90:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(_Sm90())
    compiled: list[tuple[str, int]] = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel.metadata.shared, _where[0]))
        _hashes.append(kernel.hash)
        if _keep_cubins[0]:
            _cubins.setdefault(kernel.hash, (self.fn.__name__, _where[0], kernel.asm["cubin"]))
        return kernel
    JITFunction.run = compile_only
    return compiled


def _attention(impl, backend: str = "triton") -> None:
    from atom.ops.metadata import AttentionMetadata, CascadeMetadata

    def meta(b, qlen=1, cascade=False):
        m = AttentionMetadata(slot_mapping=torch.zeros(b * qlen, dtype=torch.int64),
                              query_start_loc=torch.arange(b + 1) * qlen, seq_lens=torch.full((b,), 2000),
                              block_tables=torch.zeros(b, 256, dtype=torch.int32), is_decode=qlen == 1,
                              max_query_len=qlen, max_seq_len=4096)
        if cascade:
            g = max(1, b // 2)
            m.cascade = CascadeMetadata(torch.zeros(g, 8, dtype=torch.int32), torch.zeros(g, dtype=torch.int32),
                                        torch.zeros(b, dtype=torch.int32), 4096)
        return m

    decode = impl("sliding_sink_attention_decode")[backend]
    prefill = impl("sliding_sink_attention_prefill")[backend]
    for dt in DTYPES:
        for hq, hk, d, page in ((64, 8, 64, 16), (4, 2, 16, 16)):  # GPT-OSS-20B, the tiny test model
            _where[0] = f"{backend} {dt} heads={hq}/{hk} head_dim={d} page={page}"
            kc = torch.empty(300, page, hk, d, dtype=dt)
            sinks = torch.empty(hq, dtype=dt)
            for window in (None, 128):
                for b in (1, 16, 256):  # split + merge, one split per window, whole own parts
                    for cascade in (False, True):
                        decode(torch.empty(b, hq, d, dtype=dt), kc, kc, meta(b, cascade=cascade), 0.125, window, sinks)
                for qlen in (7, 100):
                    prefill(torch.empty(2 * qlen, hq, d, dtype=dt), kc, kc, meta(2, qlen), 0.125, window, sinks)


def _experts(impl, backend: str = "triton") -> None:
    op = impl("fused_moe_biased")[backend]
    e, h, i, k = 32, 2880, 2880, 4  # GPT-OSS-20B
    for dt in DTYPES:
        _where[0] = f"{backend} {dt} experts={e} hidden={h} intermediate={i}"
        w13, b13 = torch.empty(e, 2 * i, h, dtype=dt), torch.empty(e, 2 * i, dtype=dt)
        w2, b2 = torch.empty(e, h, i, dtype=dt), torch.empty(e, h, dtype=dt)
        for t in (1, 4, 5, 64, 700, 4096):  # the small path, then the aligned one's tile configs
            x, weights, ids = torch.empty(t, h, dtype=dt), torch.empty(t, k), torch.zeros(t, k, dtype=torch.int64)
            for down_bias in (b2, None):
                op(x, w13, b13, w2, down_bias, weights, ids, 7.0, 1.702)


def _invariant_families(impl) -> None:
    """The batch-invariant backend's GPT-OSS ops: attention (window, sinks; whole and split decode),
    the biased experts on the fixed tiles, the clamped SwiGLU at GPT-OSS-20B's width."""
    import atom.ops.triton.invariant  # noqa: F401 (registers the backend)
    _attention(impl, "triton_invariant")
    _experts(impl, "triton_invariant")
    op = impl("clamped_swiglu")["triton_invariant"]
    for dt in DTYPES:
        _where[0] = f"triton_invariant {dt} clamped_swiglu 2I=5760"
        for t in (1, 700):
            op(torch.empty(t, 5760, dtype=dt), 7.0, 1.702)


def _moe_tune(impl) -> None:
    """The fused MoE under every tile config `bench/moe_tune.py` may install (bf16, as swept):
    the aligned path's candidates at GPT-OSS-20B's shape (biases + clamped SwiGLU) and
    Moonlight-16B-A3B's (SiLU), the small path's at GPT-OSS-20B's."""
    from atom.ops import moe_tiles
    from atom.ops.triton.moe import Epilogue, SILU, experts_aligned
    from bench.moe_tune import CANDIDATES, SHAPES, SMALL_CANDIDATES
    dt = torch.bfloat16
    for s in SHAPES.values():
        w13, w2 = torch.empty(s.experts, 2 * s.inter, s.hidden, dtype=dt), torch.empty(s.experts, s.hidden, s.inter, dtype=dt)
        b13, b2 = torch.empty(s.experts, 2 * s.inter, dtype=dt), torch.empty(s.experts, s.hidden, dtype=dt)
        ep = Epilogue(b13, b2, "clamped_swiglu", 7.0, 1.702) if s.biased else SILU
        for t, cands in CANDIDATES.items():
            x, weights, ids = torch.empty(t, s.hidden, dtype=dt), torch.empty(t, s.top_k), torch.zeros(t, s.top_k, dtype=torch.int64)
            for up, down in cands:
                _where[0] = f"{s.name} T={t} up {up} down {down}"
                experts_aligned(x, w13, w2, weights, ids, ep, up, down)
        if s.biased:
            op, shape = impl("fused_moe_biased")["triton"], moe_tiles.shape_of(w13)
            x, weights, ids = torch.empty(1, s.hidden, dtype=dt), torch.empty(1, s.top_k), torch.zeros(1, s.top_k, dtype=torch.int64)
            for cfg in SMALL_CANDIDATES:
                _where[0] = f"{s.name} small path {cfg}"
                moe_tiles.install_small(shape, cfg)
                op(x, w13, b13, w2, b2, weights, ids, 7.0, 1.702)
            moe_tiles.TABLE.pop(shape)


# (heads, kv_lora_rank, qk_rope_head_dim, page): Moonlight-16B-A3B, its TP2 share, DeepSeek-V3,
# then tests/gpu/test_mla_triton.py's interpreter shapes (the tiny test model's first).
MLA_MODEL_SHAPES = ((16, 512, 64, 16), (8, 512, 64, 16), (128, 512, 64, 16))
MLA_TEST_SHAPES = ((4, 32, 8, 16), (20, 48, 24, 16), (16, 64, 16, 32))
# tests/gpu/test_mla_triton.py's overrides of MLA_CFG (its prefix_cfg fixture's value-chunk case,
# on the GPU): the one-pass prefix kernel, since the default runs two passes (session 13).
MLA_TEST_CFG = {"prefix_dv": 128, "prefix_heads": 8, "prefix_two_pass": False}


def _mla_decode(op, dt, shape, cfg, whole, cascade, small_prefix=False) -> None:
    """One decode call under MLA_CFG changed by cfg: split own parts + merge or whole own parts,
    with or without shared-prefix groups of the decode runner's size (cascade_group_rows under
    that MLA_CFG)."""
    import atom.ops.triton.mla as mla
    from atom.ops.metadata import AttentionMetadata, CascadeMetadata
    heads, lat, rope, page = shape
    saved = dict(mla.MLA_CFG)
    mla.MLA_CFG.update(cfg, whole_own_pairs=1 if whole else 1 << 40,
                       small_prefix_pairs=1 << 40 if small_prefix else 1)
    b, max_n = 32, mla.cascade_group_rows("mla_attention_decode", heads)
    meta = AttentionMetadata(slot_mapping=torch.zeros(b, dtype=torch.int64), query_start_loc=torch.arange(b + 1),
                             seq_lens=torch.full((b,), 2000), block_tables=torch.zeros(b, 256, dtype=torch.int32),
                             is_decode=True, max_query_len=1, max_seq_len=4096)
    if cascade:
        meta.cascade = CascadeMetadata(torch.zeros(b // 2, max_n, dtype=torch.int32),
                                       torch.zeros(b // 2, dtype=torch.int32), torch.zeros(b, dtype=torch.int32), 4096)
    cache = torch.empty(300, page, 1, lat + rope, dtype=dt)
    q_pe = torch.empty(b, heads, lat + rope, dtype=dt)[..., lat:]  # strided, as the model passes it
    _where[0] = f"{dt} heads={heads} L={lat} R={rope} page={page} whole={whole} cascade={cascade} {cfg}"
    try:
        op(torch.empty(b, heads, lat, dtype=dt), q_pe, cache, meta, 0.1)
    finally:
        mla.MLA_CFG.clear()
        mla.MLA_CFG.update(saved)


def _mla(impl) -> None:
    """Every shape: the default MLA_CFG in each mode and the tests' prefix config; the model
    shapes also under each tuner candidate, with both own-part kernels (split without groups,
    whole with groups) and the shared-prefix kernel."""
    from bench.mla_kernels import TUNE_SPACE
    decode, write = impl("mla_attention_decode")["triton"], impl("mla_cache_write")["triton"]
    rotary = impl("rotary_embedding")["triton"]
    candidates = [dict(zip(keys, cand)) for keys, cands in TUNE_SPACE for cand in cands]
    for dt in DTYPES:
        for shape in MLA_MODEL_SHAPES + MLA_TEST_SHAPES:
            for whole, cascade, small in itertools.product((False, True), repeat=3):
                if cascade or not small:
                    _mla_decode(decode, dt, shape, {}, whole, cascade, small)
            _mla_decode(decode, dt, shape, MLA_TEST_CFG, False, True)
            for cfg in candidates if shape in MLA_MODEL_SHAPES else ():
                _mla_decode(decode, dt, shape, cfg, False, False)
                _mla_decode(decode, dt, shape, cfg, True, True)
        for _, lat, rope, page in MLA_MODEL_SHAPES[:1] + MLA_TEST_SHAPES:
            _where[0] = f"{dt} cache write L={lat} R={rope} page={page}"
            write(torch.empty(5, lat, dtype=dt), torch.empty(5, 3, rope, dtype=dt)[:, 1],
                  torch.empty(10, page, 1, lat + rope, dtype=dt), torch.zeros(5, dtype=torch.int64))
            # the layer's RoPE on interleaved pairs: q_pe a strided view of q, k_pe of kv_a's output
            _where[0] = f"{dt} interleaved rope R={rope}"
            rotary(torch.zeros(5, dtype=torch.int64), torch.empty(5, 16, 128 + rope, dtype=dt)[..., 128:],
                   torch.empty(5, lat + rope, dtype=dt)[:, lat:].reshape(5, 1, rope),
                   torch.empty(64, rope, dtype=torch.float32), interleaved=True)


# (experts, groups, groups kept, top_k): DeepSeek-V3, Moonlight, the tiny test model.
ROUTE_SHAPES = ((256, 8, 4, 8), (64, 1, 1, 6), (8, 4, 2, 2))


def _mla_invariant(impl) -> None:
    """The triton_invariant backend's DeepSeek-V3 ops (its decode under the default MLA_CFG and
    with reuse_kv; prefill rows; absorb / expand GEMMs with DeepSeek-V3's nope = v = 128; the
    router logits, shared with the triton backend)."""
    import atom.ops.triton.invariant  # noqa: F401 (registers the backend)
    import atom.ops.triton.mla as mla
    from atom.ops.metadata import AttentionMetadata
    inv = {name: impl(name)["triton_invariant"] for name in
           ("mla_attention_decode", "mla_attention_prefill", "moe_route_grouped")}
    for dt in DTYPES:
        for heads, lat, rope, page in MLA_MODEL_SHAPES + MLA_TEST_SHAPES:
            nope = 128 if lat == 512 else 16
            b = 32
            meta = AttentionMetadata(slot_mapping=torch.zeros(b, dtype=torch.int64), query_start_loc=torch.arange(b + 1),
                                     seq_lens=torch.full((b,), 2000), block_tables=torch.zeros(b, 256, dtype=torch.int32),
                                     is_decode=True, max_query_len=1, max_seq_len=4096)
            cache = torch.empty(300, page, 1, lat + rope, dtype=dt)
            q_pe = torch.empty(b, heads, lat + rope, dtype=dt)[..., lat:]
            for reuse in (False, True):
                _where[0] = f"{dt} invariant decode heads={heads} L={lat} R={rope} page={page} reuse_kv={reuse}"
                saved = dict(mla.MLA_CFG)
                mla.MLA_CFG["reuse_kv"] = reuse
                try:
                    inv["mla_attention_decode"](torch.empty(b, heads, lat, dtype=dt), q_pe, cache, meta, 0.1)
                finally:
                    mla.MLA_CFG.clear()
                    mla.MLA_CFG.update(saved)
            _where[0] = f"{dt} invariant prefill heads={heads} L={lat} R={rope} nope={nope}"
            pmeta = AttentionMetadata(slot_mapping=torch.zeros(b, dtype=torch.int64),
                                      query_start_loc=torch.tensor([0, 12, b]), seq_lens=torch.tensor([12, 2000]),
                                      block_tables=torch.zeros(2, 256, dtype=torch.int32), is_decode=False,
                                      max_query_len=20, max_seq_len=2000)
            q = torch.empty(b, heads, nope + rope, dtype=dt)
            inv["mla_attention_prefill"](q[..., :nope], q[..., nope:], cache,
                                         torch.empty(heads * 2 * nope, lat, dtype=dt), pmeta, 0.1)
    for e, groups, kept, k in ROUTE_SHAPES:
        _where[0] = f"grouped routing experts={e} groups={groups} kept={kept} top_k={k}"
        for renorm in (False, True):
            inv["moe_route_grouped"](torch.empty(7, e), torch.empty(e), k, groups, kept, renorm, 2.5)
    router = impl("router_linear")["triton"]
    for t, h, e in ((512, 2048, 64), (512, 7168, 256), (7, 64, 8)):  # Moonlight, DeepSeek-V3, tiny
        for xd, wd in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
            _where[0] = f"router logits T={t} H={h} E={e} x {xd} weight {wd}"
            router(torch.empty(t, h, dtype=xd), torch.empty(e, h, dtype=wd))


# (N, K) of the batch-invariant GEMM: Qwen3-8B's qkv, o_proj, gate_up, down, lm_head, then the
# interpreter test shapes (uneven K, narrow N).
GEMM_MODEL_SHAPES = ((6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (151936, 4096))
GEMM_TEST_SHAPES = ((48, 64), (200, 96), (16, 40))


def _gemm(impl) -> None:
    """The invariant GEMM at the model shapes under every sweep candidate (bench.batch_invariant
    CANDIDATES: pointer / TMA loads, persistent grid, split-K) and the engine's own choice, bf16
    and float32. Each config is launched at M = 1, 37, 512 and 8192, and the four launches must
    compile to one kernel (same hash): M never reaches the generated code."""
    from atom.ops.triton.invariant_gemm import gemm_config, invariant_gemm
    from bench.batch_invariant import CANDIDATES, as_config
    bad = []
    for dt in DTYPES:
        for n, k in GEMM_MODEL_SHAPES + GEMM_TEST_SHAPES:
            w = torch.empty(n, k, dtype=dt)
            own = gemm_config(n, k, w.element_size())
            # The sweep (bf16 model shapes) may pick any candidate; elsewhere the variants of the rule's tile.
            sweep = dt == torch.bfloat16 and (n, k) in GEMM_MODEL_SHAPES
            configs = [own] + ([as_config(c) for c in CANDIDATES] if sweep else
                               [{**own, "tma": True}, {**own, "tma": True, "split_k": 2, "persistent": True},
                                {**own, "split_k": 3, "fold_last": True, "persistent": True}])
            for cfg in configs:
                _where[0] = f"{dt} N={n} K={k} {cfg}"
                seen = len(_hashes)
                for m in (1, 37, 512, 8192):
                    invariant_gemm(torch.empty(m, k, dtype=dt), w, torch.empty(n, dtype=dt), config=cfg)
                two = cfg["split_k"] > 1 and k > cfg["block_k"] and not cfg["fold_last"]  # + sum_parts_kernel
                if len(set(_hashes[seen:])) != (2 if two else 1):
                    bad.append(_where[0])
    if bad:
        raise SystemExit("invariant GEMM compiled differently for different M: " + "; ".join(bad))


def _sampling(impl) -> None:
    """The sampler (one-program and split paths) with and without the in-kernel rank count, mixed
    raw rows, at Qwen3's and GPT-OSS's vocabularies, on float32 and bf16 logits (read as they are)."""
    from atom.ops.metadata import SamplingMetadata
    sample = impl("sample")["triton"]
    for vocab, rows, split, ranks, dt in itertools.product((151936, 201088), (4, 512), (False, True), (False, True),
                                                           (torch.float32, torch.bfloat16)):
        _where[0] = f"vocab={vocab} rows={rows} split={split} ranks={ranks} logits={dt}"
        meta = SamplingMetadata(
            temperature=torch.full((rows,), 0.7), top_k=torch.zeros(rows, dtype=torch.int64),
            top_p=torch.ones(rows), min_p=torch.zeros(rows), seeds=torch.arange(rows), counters=torch.arange(rows),
            raw_logprobs=torch.arange(rows) % 2 == 0, banned_rows=None, banned_tokens=None, need_filter=False,
            all_greedy=False, any_raw=True, num_top_logprobs=0, want_ranks=ranks)
        sample(torch.empty(rows, vocab, dtype=dt), meta, split=split)


FAMILIES = {"gemm": _gemm, "sampling": _sampling,
            "gpt_oss": (lambda impl: (_attention(impl), _experts(impl), _invariant_families(impl))), "mla": _mla,
            "mla_invariant": _mla_invariant, "moe_tune": _moe_tune}


def _print_registers() -> None:
    """Registers a thread and spill bytes of every distinct compiled kernel (cuobjdump -res-usage,
    bundled with Triton): a kernel's programs an SM are bounded by 65,536 / (registers x threads),
    so this shows occupancy limits before device time is spent (session 14)."""
    import pathlib
    import re
    import subprocess
    import tempfile

    import triton
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage: dict[str, list[tuple[int, int, str]]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, where, cubin) in enumerate(_cubins.values()):
            path = pathlib.Path(tmp) / f"{i}.cubin"
            path.write_bytes(cubin)
            out = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True).stdout
            found = re.search(r"REG:(\d+) STACK:(\d+)", out)
            if found:
                usage[name].append((int(found.group(1)), int(found.group(2)), where))
    for name, rows in sorted(usage.items()):
        regs, stack, where = max(rows)
        spills = sum(1 for _, st, _ in rows if st)
        print(f"{name:<28} registers up to {regs:>3} ({where}); {spills} of {len(rows)} specialisations spill")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(FAMILIES), action="append", help="these families (default: all)")
    parser.add_argument("--regs", action="store_true", help="also print registers and spills per kernel")
    args = parser.parse_args()
    families = args.only or sorted(FAMILIES)
    _keep_cubins[0] = args.regs
    compiled = _compile_only()
    from atom.ops import implementations
    import atom.ops.triton  # noqa: F401 (registers the triton ops)
    for family in families:
        FAMILIES[family](implementations)
    counts = collections.Counter(name for name, _, _ in compiled)
    for name, n in sorted(counts.items()):
        shared, where = max((s, w) for k, s, w in compiled if k == name)
        print(f"{name:<28} {n:>4} launches compiled, max shared memory {shared:>7} B ({where})")
    worst = max(s for _, s, _ in compiled)
    print(f"{len(compiled)} launches compiled for sm_90; largest shared memory {worst} B of {H200_SHARED}")
    if args.regs:
        _print_registers()
    over = sorted({(name, s, where) for name, s, where in compiled if s > H200_SHARED})
    for name, s, where in over:
        print(f"OVER: {name} needs {s} B at {where}")
    if over:
        raise SystemExit(f"{len(over)} launches need more shared memory than an H200 block has")


if __name__ == "__main__":
    main()
