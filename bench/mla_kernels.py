"""MLA decode (atom/ops/triton/mla.py) and prefill (atom/ops/mla_prefill.py) at the Moonlight-16B-A3B shape (16 heads, kv_lora_rank 512,
qk_rope_head_dim 64, bf16): `python -m bench.mla_kernels`. Prints median time, the bytes the
attention must read (each prompt's latents once, every sequence's own ones), the fraction of the
copy bandwidth that is, and the tensor-core FLOP rate (scores over L + R, output over L).
`python -m bench.mla_kernels --tune FILE` sweeps MLA_CFG and writes {"mla": {...}}, which
`python -m bench.rollout --tuned FILE` (bench.kernels.apply_tuned) loads.
`python -m bench.mla_kernels --prefill` times only the prefill: 8192-token chunks (8 x 1024 new
tokens, fresh and over a 1024 cached prefix) against the bf16 FLOP ceiling (the attention's causal
FLOPs plus the latent expansion's), then the absorbed / expanded break-even (ABSORB_MAX_Q)."""
from __future__ import annotations

import json
import os
import sys

import torch

from atom.ops import implementations
from atom.ops.metadata import AttentionMetadata, CascadeMetadata
from bench.kernels import bench

HEADS, LAT, ROPE = 16, 512, 64


def mla_batch(bsz: int, prompt: int, gen: int, n: int, max_n: int, heads: int = HEADS, cascade: bool = True,
              page: int = 16, dev: str = "cuda"):
    """bsz rows in prompts of n samples sharing `prompt` tokens, each with `gen` own tokens; groups
    of at most max_n rows (the decode runner's grouping: 4 for 16 query heads)."""
    prompts, pb, own = bsz // n, prompt // page, -(-gen // page) + 1
    blocks = prompts * pb + bsz * own
    cache = torch.randn(blocks, page, 1, LAT + ROPE, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(blocks, device=dev).int()
    prefix = [perm[p * pb:(p + 1) * pb] for p in range(prompts)]
    at = prompts * pb
    tables = []
    for r in range(bsz):
        tables.append(torch.cat([prefix[r // n], perm[at + r * own: at + (r + 1) * own]]))
    seq_lens = torch.full((bsz,), prompt + gen, device=dev, dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.full((bsz,), -1, device=dev), query_start_loc=None,
                             seq_lens=seq_lens, block_tables=torch.stack(tables), is_decode=True, max_query_len=1,
                             max_seq_len=prompt + gen + 1)
    if cascade and n > 1:
        cap = max(1, bsz // 2)  # the runner's group capacity
        rows = torch.full((cap, max_n), -1, dtype=torch.int32)
        plen = torch.zeros(cap, dtype=torch.int32)
        g = 0
        for p in range(prompts):
            for c0 in range(0, n, max_n):
                members = list(range(p * n + c0, p * n + min(n, c0 + max_n)))
                rows[g, :len(members)] = torch.tensor(members, dtype=torch.int32)
                plen[g] = pb * page
                g += 1
        meta.cascade = CascadeMetadata(rows.to(dev), plen.to(dev),
                                       torch.full((bsz,), pb * page, device=dev, dtype=torch.int32),
                                       prompt + gen + 1)
    q_lat = torch.randn(bsz, heads, LAT, device=dev, dtype=torch.bfloat16)
    q_pe = torch.randn(bsz, heads, ROPE, device=dev, dtype=torch.bfloat16)
    return q_lat, q_pe, cache, meta


CASES = {  # name: (bsz, prompt, gen, n, heads); groups of the decode runner's size (cascade_group_rows)
    "mla-decode bs512 shared (grpo-mla-moe)": (512, 1024, 512, 8, HEADS),
    "mla-decode bs64 shared": (64, 1024, 512, 8, HEADS),
    "mla-decode bs1": (1, 128, 384, 1, HEADS),
    "mla-decode 128 heads bs64 shared": (64, 1024, 512, 8, 128),
}


# What --tune sweeps, one group of MLA_CFG keys after the other (each group's best is kept).
# scripts/compile_kernels.py compiles every candidate in bf16 and float32 at the model shapes, so
# that none can ask for more shared memory than an H200 block has (prefix (256, 64, 8, 2) asked
# for 280 KiB in bf16 at 16 heads: the sweep always skipped it, so it is not listed).
TUNE_SPACE = (
    # Score tiles of T tokens stepped through by the values kernel TV at a time (session 14):
    # a scores program reads its 128 query rows x 576 from L2 once per tile, so a larger T
    # halves that traffic while the values kernel keeps 64-token steps (T = 128 in both spilled).
    # Session 14's H200 (bs512, bs64, 128 heads; us): (64, 64) [202, 61, 187], (128, 64)
    # [195, 65, 181], within the tuner's margin: 64 kept. Session 16 (p read vectorised): (64, 64)
    # [188, 57, 162], (128, 64) [179, 61, 156], (128, 32) [193, 63, 165], (256, 64) [183, 62,
    # 156], (128, 64, 4 stages) [192, 58, 165]: 128-token tiles from 4,096 batch rows x heads on
    # (two_pass_wide_tile; bs64 x 16 heads has 8 groups: too few programs at 128).
    (("two_pass_tile", "two_pass_wide_tile", "two_pass_value_tile", "two_pass_stages"),
     [(64, 128, 64, 3), (64, 64, 64, 3), (128, 128, 64, 3), (64, 256, 64, 3)]),
    # The own part's tiles, its latent in four column chunks since session 15 (H200 tuner, with
    # the whole-width form then beside it; bs512, bs64, 128 heads, us): whole width 32 tokens
    # [209, 61, 194]; chunks 32 tokens [195, 60, 171], 16 tokens [212, 68, 195], 16 tokens 4
    # stages [273, 68, 262], 32 tokens 8 warps [219, 65, 201]. A register cap on the two-pass
    # scores kernel (80, 72) and the values kernel taking each split's row max first were within
    # the margin and removed; 8 heads per two-pass row block lost (226, 58, 194). Then (p read
    # vectorised): 32 tokens 3 stages [189, 57, 161], 2 stages [217, 62, 193], 16 tokens [205,
    # 65, 186]. The values kernel as 64-row 4-warp programs, two an SM: [201-217, 56-58, 167-179].
    (("block_n", "warps", "stages"), [(32, 4, 3), (32, 4, 2), (16, 4, 3)]),
    # The prefix in two passes (session 12): a scores kernel whose warpgroups hold 64 rows x T
    # tokens each (sm_90: wgmma m64nTk16, not the one-pass kernel's m64n16k16), then a values
    # kernel summing p . values over `two_pass_dv` columns (m64n256k16), 128 rows per program.
    (("prefix_two_pass", "two_pass_tile", "two_pass_dv", "two_pass_warps", "two_pass_stages"),
     [(False, 64, 256, 8, 2), (True, 64, 256, 8, 3), (True, 128, 256, 8, 2), (True, 64, 128, 8, 3),
      (True, 32, 256, 8, 3)]),
    # The own part's tiles. Since its block ids load a tile ahead (session 14), stages 3 gives
    # the latent tiles two buffers: [202, 61, 187] us against stages 2's [224, 64, 202].
    (("block_n", "warps", "stages"),
     [(32, 4, 3), (16, 4, 3), (32, 8, 3), (16, 2, 3), (32, 4, 2)]),
    (("whole_own_pairs", "split", "prefix_split"),
     [(256, 256, 1024), (128, 256, 1024), (1024, 256, 1024), (256, 512, 512), (256, 256, 512)]),
    # Groups of one prompt's 8 samples (new in session 11): with prefix_heads 8 the tile is the
    # default's 64 rows and the FLOPs the same, while a group's two head-block programs read the
    # prompt's latents side by side (from DRAM about once, not once per 4 samples). At 128 heads
    # the same gives 8 x 8 = 64 rows too. (8, 16, 256), 128 rows, asked 248 KiB in bf16: not listed.
    (("prefix_group", "prefix_heads", "prefix_dv"),
     [(None, 16, 512), (8, 8, 512)]),
    # The one-pass prefix kernel's tiles (the default until session 13, now the fallback when the
    # p scratch would be too large): each candidate runs one pass, against the two-pass default.
    # The whole latent per prefix program with one load of each tile for scores and values
    # (64 rows x 512 fp32 over two warpgroups; sm_90: 255 registers, no spills, 144 KiB) against
    # the 256-column value chunks that compute the scores twice.
    (("prefix_two_pass", "prefix_dv", "prefix_reuse_kv", "prefix_block_n", "prefix_stages"),
     [(False, 256, False, 32, 2), (False, 512, True, 32, 2), (False, 512, True, 16, 3)]),
    # Fewer heads per prefix tile (Moonlight: 16 heads x 4 members = 64 rows by default): fewer
    # registers and shared memory per program (ptxas, sm_90: 198 registers and 180 KB at 16 heads,
    # one program per SM; 107-128 registers and 73-92 KB at 4-8, two), against reading the
    # prefix's latents once per head block (from L2: the blocks of a group run side by side).
    (("prefix_two_pass", "prefix_heads", "prefix_dv", "prefix_warps"),
     [(False, 8, 256, 8), (False, 4, 512, 8), (False, 8, 256, 4)]),
)


def measure(dec, case, cascade=True, graph=True) -> tuple[float, float, float]:
    """(seconds, bytes needed, FLOPs) of one call; `graph`: replayed from a CUDA graph as the
    decode runner does (the torch reference syncs the host, so it runs eager). Eager launches of
    the three kernels cost the host ~50-100 us, which swung the 100 us cases by 2x between
    identical configs on a loaded host."""
    import triton
    from atom.ops.triton.mla import cascade_group_rows
    bsz, prompt, gen, n, heads = case
    max_n = cascade_group_rows("mla_attention_decode", heads)  # under the MLA_CFG being measured
    q_lat, q_pe, cache, meta = mla_batch(bsz, prompt, gen, n, max_n, heads, cascade)
    call = lambda: dec(q_lat, q_pe, cache, meta, 192 ** -0.5)  # noqa: E731
    if not graph:
        t = bench(call)
    else:
        call()  # compile outside the capture
        torch.cuda.synchronize()
        t = triton.testing.do_bench_cudagraph(call, rep=50, return_mode="median") / 1e3
    need = (bsz // n * prompt + bsz * gen) * (LAT + ROPE) * 2
    flops = bsz * heads * (prompt + gen) * 2 * (2 * LAT + ROPE)
    return t, need, flops


def sweep_group(cfg: dict, keys: tuple, cands: list, times_of, margin: float = 0.02) -> dict | None:
    """One TUNE_SPACE group: each candidate's times over the cases (times_of(config) -> list of
    seconds; an exception skips the candidate) against cfg's own, scored as the mean time ratio.
    Returns the best config when it beats cfg by more than `margin`, else None."""
    base = times_of(cfg)
    best, best_score = None, 1.0 - margin
    for cand in cands:
        trial = {**cfg, **dict(zip(keys, cand))}
        try:
            times = times_of(trial)
        except Exception as exc:  # a config that does not compile / fit
            print("  skip", cand, type(exc).__name__)
            continue
        score = sum(t / b for t, b in zip(times, base)) / len(base)
        print(f"  {dict(zip(keys, cand))}: {[round(t * 1e6) for t in times]} us, score {score:.3f}")
        if score < best_score:
            best, best_score = trial, score
    return best


def tune(out_path: str, space: tuple = TUNE_SPACE) -> None:
    import atom.ops.triton.mla as mla
    dec = implementations("mla_attention_decode")["triton"]
    cases = [c for name, c in CASES.items() if "shared" in name]

    def times_of(cfg: dict) -> list[float]:
        saved = dict(mla.MLA_CFG)
        mla.MLA_CFG.update(cfg)
        try:
            return [measure(dec, c)[0] for c in cases]
        finally:
            mla.MLA_CFG.clear()
            mla.MLA_CFG.update(saved)
    for keys, cands in space:
        best = sweep_group(dict(mla.MLA_CFG), keys, cands, times_of)
        if best is not None:
            mla.MLA_CFG.update(best)
        print("->", mla.MLA_CFG, flush=True)
        # Written after every group: a sweep cut short by its time limit keeps what it found.
        tuned = json.load(open(out_path)) if os.path.isfile(out_path) else {}
        tuned["mla"] = dict(mla.MLA_CFG)
        json.dump(tuned, open(out_path, "w"))
    print("tuned ->", out_path, json.dumps({"mla": mla.MLA_CFG}))


PREFILL_CASES = {  # name: (ctx, new) per sequence
    "mla-prefill 8x1024 fresh (one 8192 chunk)": ([1024] * 8, [1024] * 8),
    "mla-prefill 8x1024 over a 1024 prefix": ([2048] * 8, [1024] * 8),
}


def prefill_batch(ctx: list[int], new: list[int], heads=HEADS, nope=128, v_dim=128, page=16, dev="cuda",
                  bf=torch.bfloat16):
    """(q_nope, q_pe, kv_cache, w_kv_b, meta) of one prefill step in bf16: sequences of ctx KV
    tokens whose last `new` are this step's, in shuffled blocks."""
    need = [-(-c // page) for c in ctx]
    perm = torch.randperm(sum(need), device=dev)
    width, at, tables = max(need), 0, []
    for n in need:
        tables.append(torch.cat([perm[at:at + n], perm.new_zeros(width - n)]))
        at += n
    starts = torch.tensor([0] + new, device=dev).cumsum(0)
    t = sum(new)
    meta = AttentionMetadata(slot_mapping=torch.full((t,), -1, device=dev), query_start_loc=starts,
                             seq_lens=torch.tensor(ctx, device=dev), block_tables=torch.stack(tables),
                             is_decode=False, max_query_len=max(new), max_seq_len=max(ctx))
    cache = torch.randn(sum(need), page, 1, LAT + ROPE, device=dev, dtype=bf)
    w_kv_b = torch.randn(heads * (nope + v_dim), LAT, device=dev, dtype=bf) * LAT ** -0.5
    return (torch.randn(t, heads, nope, device=dev, dtype=bf), torch.randn(t, heads, ROPE, device=dev, dtype=bf),
            cache, w_kv_b, meta)


def prefill_flops(ctx: list[int], new: list[int], heads=HEADS, nope=128, v_dim=128) -> float:
    """Causal attention (query i of q new tokens sees ctx - q + i + 1 keys; scores over
    nope + rope, output over v) plus the expansion of every context latent to K_nope and V."""
    pairs = sum(q * (c - q) + q * (q + 1) / 2 for c, q in zip(ctx, new))
    return pairs * heads * 2 * (nope + ROPE + v_dim) + sum(ctx) * LAT * heads * (nope + v_dim) * 2


def prefill_main(ceil: dict) -> None:
    import atom.ops.mla_prefill as mp
    rate = ceil.get("bf16_flops_per_s", 7.0e14)
    impls = implementations("mla_attention_prefill")
    dec = implementations("mla_attention_decode")["triton"]
    print(f"\n{'prefill (one layer)':<60} {'us':>9} {'TFLOP/s':>8} {'of bf16 peak':>12}")
    for name, (ctx, new) in PREFILL_CASES.items():
        args = prefill_batch(ctx, new)
        flops = prefill_flops(ctx, new)
        for suffix, fn in (("", lambda: impls["triton"](*args, 192 ** -0.5)),
                           (" sdpa per sequence", lambda: mp.mla_prefill(*args, 192 ** -0.5, dec, use_flash=False)),
                           (" (torch ref)", lambda: impls["torch"](*args, 192 ** -0.5))):
            t = bench(fn)
            print(f"{name + suffix:<60} {t * 1e6:>9.1f} {flops / t / 1e12:>8.1f} {flops / t / rate:>12.1%}")
    print(f"\n{'8 seqs, q new over ctx 2048':<30} {'absorbed us':>12} {'expanded us':>12}  (ABSORB_MAX_Q={mp.ABSORB_MAX_Q})")
    saved = mp.ABSORB_MAX_Q
    for q in (1, 8, 16, 32, 64, 128):
        args = prefill_batch([2048] * 8, [q] * 8)
        times = []
        for cut in (1 << 30, 0):
            mp.ABSORB_MAX_Q = cut
            times.append(bench(lambda: impls["triton"](*args, 192 ** -0.5)))
        mp.ABSORB_MAX_Q = saved
        print(f"{'q = ' + str(q):<30} {times[0] * 1e6:>12.1f} {times[1] * 1e6:>12.1f}")


def main() -> None:
    import atom.ops.triton  # noqa: F401
    if "--prefill" in sys.argv:
        ceil_path = os.environ.get("ATOM_BENCH_CEILINGS", "/tmp/atom_ceilings.json")
        return prefill_main(json.load(open(ceil_path)) if os.path.isfile(ceil_path) else {})
    if len(sys.argv) > 2 and sys.argv[1] == "--tune":  # --first N: only the first N groups of TUNE_SPACE
        first = int(sys.argv[sys.argv.index("--first") + 1]) if "--first" in sys.argv[:-1] else len(TUNE_SPACE)
        return tune(sys.argv[2], TUNE_SPACE[:first])
    if len(sys.argv) > 2 and sys.argv[1] == "--tuned":
        from bench.kernels import apply_tuned
        apply_tuned(sys.argv[2])
    ceil_path = os.environ.get("ATOM_BENCH_CEILINGS", "/tmp/atom_ceilings.json")
    bw = json.load(open(ceil_path))["copy_bytes_per_s"] if os.path.isfile(ceil_path) else 4.3e12
    impls = implementations("mla_attention_decode")
    # --case TEXT: only the cases whose name holds TEXT, no prefill (scripts/gpu_check.sh's `ncu`
    # runs one case under Nsight Compute)
    only = sys.argv[sys.argv.index("--case") + 1] if "--case" in sys.argv[:-1] else None
    print(f"{'kernel':<48} {'us':>9} {'GB/s':>7} {'of copy bw':>10} {'TFLOP/s':>8}")
    for name, case in CASES.items():
        if only is not None and only not in name:
            continue
        variants = [("", impls["triton"], True, True)]
        if case[3] > 1:
            variants.append((" no cascade", impls["triton"], False, True))
        if case[0] <= 64:  # the torch reference: gathers every block, float32
            variants.append((" (torch ref)", impls["torch"], False, False))
        for suffix, fn, casc, graph in variants:
            t, need, flops = measure(fn, case, casc, graph)
            print(f"{name + suffix:<48} {t * 1e6:>9.1f} {need / t / 1e9:>7.0f} {need / t / bw:>10.1%} "
                  f"{flops / t / 1e12:>8.1f}")
    if only is None:
        prefill_main(json.load(open(ceil_path)) if os.path.isfile(ceil_path) else {})


if __name__ == "__main__":
    main()
