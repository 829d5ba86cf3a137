"""Micro-benchmarks of the triton kernels at the benchmark models' shapes:
`python -m bench.kernels`. Prints median time, achieved bandwidth and the share of the copy
bandwidth each reaches (memory-bound kernels: bytes they must read + write).
`python -m bench.kernels --tune FILE [--attention-only]` sweeps tile configs and writes the best
(decode attention; fused MoE at Qwen3-30B-A3B's shape: the default ladder), `python -m
bench.moe_tune FILE` adds GPT-OSS-20B's and Moonlight-16B-A3B's per-shape MoE tiles to the same
file; `python -m bench.rollout --tuned FILE` runs with them (apply_tuned)."""
from __future__ import annotations

import json
import os

import torch

from atom.ops import implementations
from atom.ops.metadata import AttentionMetadata, CascadeMetadata, SamplingMetadata
from bench.timing import graph_of


def bench(fn) -> float:
    import triton  # here, not at the top: apply_tuned is used (and tested) without Triton
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def paged(bsz, prompt, gen, n, hq, hk, d, page=16, dtype=torch.bfloat16, cascade=True):
    """bsz rows in groups of n sharing a prompt of `prompt` tokens, each with `gen` own tokens."""
    dev = "cuda"
    groups = bsz // n
    pb = prompt // page
    own = -(-gen // page) + 1
    blocks = groups * pb + bsz * own
    kc = torch.randn(blocks, page, hk, d, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    perm = torch.randperm(blocks, device=dev).int()
    tables, at = [], 0
    prefix = []
    for g in range(groups):
        prefix.append(perm[at: at + pb])
        at += pb
    for r in range(bsz):
        tables.append(torch.cat([prefix[r // n], perm[at: at + own]]))
        at += own
    bt = torch.stack(tables)
    seq_lens = torch.full((bsz,), prompt + gen, device=dev, dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.full((bsz,), -1, device=dev), query_start_loc=None, seq_lens=seq_lens,
                             block_tables=bt, is_decode=True, max_query_len=1, max_seq_len=prompt + gen + 1)
    if cascade and n > 1:
        rows = torch.arange(bsz, device=dev, dtype=torch.int32).view(groups, n)
        meta.cascade = CascadeMetadata(rows, torch.full((groups,), pb * page, device=dev, dtype=torch.int32),
                                       torch.full((bsz,), pb * page, device=dev, dtype=torch.int32), prompt + gen + 1)
    q = torch.randn(bsz, hq, d, device=dev, dtype=dtype)
    return q, kc, vc, meta


def apply_tuned(path: str) -> dict:
    """Load a --tune result into the kernels' config tables (this process)."""
    from atom.ops import moe_tiles
    tuned = json.load(open(path))
    if tuned.get("attn"):
        import atom.ops.triton.attention as attn
        attn.DECODE_CFG.update(tuned["attn"])
    if tuned.get("mla"):  # bench/mla_kernels.py --tune
        import atom.ops.triton.mla as mla
        mla.MLA_CFG.update(tuned["mla"])
    for bound, up, down in tuned.get("moe", []):  # the default ladder (Qwen3-30B-A3B's sweep below)
        set_rung(moe_tiles.DEFAULT_LADDER, bound, up, down)
    moe_tiles.install_json(tuned.get("moe_shapes", []))  # per-shape ladders (bench/moe_tune.py)
    return tuned


def set_rung(ladder: list, bound: int, up: dict, down: dict) -> None:
    """Replace the rung of `ladder` whose bound is `bound` (in place)."""
    ladder[:] = [(b, up, down) if b == bound else (b, u, d) for b, u, d in ladder]


def tune(out_path: str, with_moe: bool = True) -> None:
    """Sweep decode-attention and fused-MoE tile configs at the benchmark shapes; write the best."""
    import atom.ops.triton  # noqa: F401
    import atom.ops.triton.attention as attn
    from atom.ops.moe_tiles import DEFAULT_LADDER
    dec = implementations("paged_attention_decode")["triton"]
    cases = [paged(512, 1024, 512, 8, 32, 4, 128), paged(512, 1024, 512, 8, 32, 8, 128),
             paged(1024, 512, 256, 8, 16, 8, 128)]

    def attn_time() -> list[float]:
        return [bench(lambda: dec(q, kc, vc, meta, 128 ** -0.5)) for q, kc, vc, meta in cases]

    def sweep(key_names, candidates):
        base = attn_time()
        best, best_score = None, len(base)
        for cand in candidates:
            saved = dict(attn.DECODE_CFG)
            attn.DECODE_CFG.update(dict(zip(key_names, cand)))
            try:
                times = attn_time()
            except Exception as exc:  # a config that does not compile / fit
                print("  skip", cand, type(exc).__name__)
                attn.DECODE_CFG.clear(); attn.DECODE_CFG.update(saved)
                continue
            score = sum(t / b for t, b in zip(times, base))
            print(f"  {dict(zip(key_names, cand))}: {[round(t * 1e6) for t in times]} us, score {score:.3f}")
            if score < best_score - 0.02:
                best, best_score = dict(attn.DECODE_CFG), score
            attn.DECODE_CFG.clear(); attn.DECODE_CFG.update(saved)
        if best is not None:
            attn.DECODE_CFG.update(best)
        print("base", [round(t * 1e6) for t in base], "us ->", attn.DECODE_CFG)

    sweep(("split", "block_n", "warps", "stages"),
          [(512, 64, 4, 3), (256, 64, 4, 3), (512, 128, 8, 2), (256, 128, 8, 2), (512, 64, 8, 3), (1024, 64, 4, 3)])
    sweep(("prefix_split", "prefix_block_n", "prefix_warps", "prefix_stages"),
          [(256, 64, 8, 2), (256, 128, 8, 2), (256, 64, 4, 3), (256, 128, 4, 2), (256, 64, 8, 3),
           (512, 64, 0, 3), (512, 64, 0, 4), (1024, 64, 0, 3), (128, 64, 0, 2), (512, 128, 8, 3),
           (1024, 128, 8, 3), (512, 32, 4, 4)])
    if not with_moe:
        json.dump({"attn": attn.DECODE_CFG}, open(out_path, "w"))
        print("tuned ->", out_path, json.dumps({"attn": attn.DECODE_CFG}))
        return

    fm = implementations("fused_moe")["triton"]
    route = implementations("moe_route")["triton"]
    e, h, i, k = 128, 2048, 768, 8
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) * 0.02

    def cfg(bm, bn, bk, gm, w, st):
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=w, num_stages=st)
    moe_cands = {
        1: [(cfg(16, 32, 128, 1, 4, 4), cfg(16, 64, 128, 1, 4, 4)), (cfg(16, 32, 64, 1, 4, 5), cfg(16, 64, 64, 1, 4, 5)),
            (cfg(16, 64, 128, 1, 4, 3), cfg(16, 128, 128, 1, 4, 3)), (cfg(16, 32, 256, 1, 4, 2), cfg(16, 64, 256, 1, 4, 2)),
            (cfg(16, 16, 128, 1, 2, 4), cfg(16, 32, 128, 1, 2, 4))],
        1024: [(cfg(64, 64, 64, 8, 4, 4), cfg(64, 128, 64, 8, 4, 4)), (cfg(32, 64, 128, 8, 4, 3), cfg(32, 128, 128, 8, 4, 3)),
               (cfg(64, 64, 128, 8, 4, 3), cfg(64, 128, 128, 8, 4, 3)), (cfg(64, 128, 64, 8, 8, 4), cfg(64, 256, 64, 8, 8, 4)),
               (cfg(16, 64, 128, 1, 4, 3), cfg(16, 128, 128, 1, 4, 3)), (cfg(32, 32, 128, 8, 4, 4), cfg(32, 64, 128, 8, 4, 4)),
               (cfg(64, 64, 64, 1, 4, 3), cfg(64, 128, 64, 1, 4, 3))],
    }
    tokens_for = {1: 1, 1024: 512}
    moe_best = []
    for bound, cands in moe_cands.items():
        t_ = tokens_for[bound]
        x = torch.randn(t_, h, device="cuda", dtype=torch.bfloat16)
        wts, ids = route(torch.randn(t_, e, device="cuda"), k, True)
        results = []
        for up, down in cands:
            set_rung(DEFAULT_LADDER, bound, up, down)
            try:
                # In a CUDA graph, as in decode: launch overhead out of the timing.
                t = bench(graph_of(lambda: fm(x, w13, w2, wts, ids), 10).replay) / 10
            except Exception as exc:
                print("  skip", up, down, type(exc).__name__)
                continue
            print(f"  moe T={t_}: {up} / {down}: {t * 1e6:.1f} us")
            results.append((t, up, down))
        t, up, down = min(results, key=lambda r: r[0])
        set_rung(DEFAULT_LADDER, bound, up, down)
        moe_best.append([bound, up, down])
        print(f"moe T={t_} best {t * 1e6:.1f} us: {up} / {down}")
    json.dump({"attn": attn.DECODE_CFG, "moe": moe_best}, open(out_path, "w"))
    print("tuned ->", out_path, json.dumps({"attn": attn.DECODE_CFG, "moe": moe_best}))


def penalty_rows() -> list:
    """Repetition + presence + frequency penalties over [B, 151936] fp32 logits from the penalty
    state (int16 counts of 1024 generated tokens and bits of a 1024-token prompt per slot): the
    fused kernel, the torch reference, and the per-step count update (one index_put_)."""
    from atom.ops.logits_processing import apply_penalties as torch_penalties, state_width
    from atom.ops.metadata import LogitsProcessing
    from atom.ops.triton.penalties import apply_penalties
    vocab, dev, out = 151936, "cuda", []
    for b in (64, 512, 1024):
        counts = torch.zeros(b, state_width(vocab), dtype=torch.int16, device=dev)
        counts.index_put_((torch.arange(b, device=dev).repeat_interleave(1024), torch.randint(0, vocab, (b * 1024,),
                          device=dev)), torch.ones((), dtype=torch.int16, device=dev), accumulate=True)
        mask = (torch.rand(b, state_width(vocab) // 8, device=dev) < 0.05).to(torch.uint8) << 3
        proc = LogitsProcessing(repetition=torch.full((b,), 1.1, device=dev), presence=torch.full((b,), 0.5, device=dev),
                                frequency=torch.full((b,), 0.2, device=dev), penalty_slots=torch.arange(b, device=dev),
                                token_counts=counts, prompt_mask=mask)
        logits = torch.randn(b, vocab, device=dev)
        need = b * vocab * (4 + 4 + 2) + mask.numel()
        out.append((f"penalties B={b}", bench(lambda: apply_penalties(logits, proc)), need))
        out.append((f"penalties B={b} (torch ref)", bench(lambda: torch_penalties(logits, proc)), need))
        slots, toks = proc.penalty_slots, torch.randint(0, vocab, (b,), device=dev)
        out.append((f"penalty count update B={b}", bench(lambda: counts.index_put_(
            (slots, toks), (slots >= 0).to(torch.int16), accumulate=True)), 0))
    return out


def gpt_oss_rows() -> list[tuple[str, float, int]]:
    """GPT-OSS-20B's family kernels: decode attention (64 / 8 heads of 64, sinks) of a sliding
    layer (window 128: reads each row's last 128 tokens) and of a full layer (GRPO groups of 8
    sharing a 1024-token prompt), and the biased clamped experts (32 experts, top-4, 2880 x 2880)."""
    rows = []
    dec = implementations("sliding_sink_attention_decode")["triton"]
    hq, hk, d = 64, 8, 64
    kv_tok = 2 * hk * d * 2
    sinks = torch.randn(hq, device="cuda", dtype=torch.bfloat16)
    for bsz in (1, 64, 512):
        n = 8 if bsz >= 8 else 1
        q, kc, vc, meta = paged(bsz, 1024, 512, n, hq, hk, d)
        t = bench(lambda: dec(q, kc, vc, meta, d ** -0.5, 128, sinks))
        rows.append((f"gpt-oss sliding decode bs{bsz}", t, bsz * 128 * kv_tok))
        t = bench(lambda: dec(q, kc, vc, meta, d ** -0.5, None, sinks))
        rows.append((f"gpt-oss full decode bs{bsz}{' shared' if n > 1 else ''}", t,
                     (bsz // n * 1024 + bsz * 512) * kv_tok))
    moe = implementations("fused_moe_biased")["triton"]
    route = implementations("moe_route")["triton"]
    e, h, i, k = 32, 2880, 2880, 4
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) * 0.02
    b13 = torch.randn(e, 2 * i, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) * 0.02
    b2 = torch.randn(e, h, device="cuda", dtype=torch.bfloat16)
    for t_ in (1, 4, 64, 512, 4096):
        x = torch.randn(t_, h, device="cuda", dtype=torch.bfloat16)
        wts, ids = route(torch.randn(t_, e, device="cuda"), k, True)
        used = ids.unique().numel()
        need = used * 3 * h * i * 2 + 2 * t_ * h * 2
        rows.append((f"fused_moe_biased T={t_} ({used} experts)",
                     bench(lambda: moe(x, w13, b13, w2, b2, wts, ids, 7.0, 1.702)), need))
    return rows


def main() -> None:
    import sys
    if len(sys.argv) > 2 and sys.argv[1] == "--tune":
        return tune(sys.argv[2], with_moe="--attention-only" not in sys.argv)
    if len(sys.argv) > 2 and sys.argv[1] == "--tuned":
        apply_tuned(sys.argv[2])
    ceil_path = os.environ.get("ATOM_BENCH_CEILINGS", "/tmp/atom_ceilings.json")
    bw = json.load(open(ceil_path))["copy_bytes_per_s"] if os.path.isfile(ceil_path) else 4.3e12
    import atom.ops.triton  # noqa: F401
    rows = []
    dec = implementations("paged_attention_decode")["triton"]
    for name, (bsz, prompt, gen, n, hq, hk) in {
        "attn-decode moe bs512 shared": (512, 1024, 512, 8, 32, 4),
        "attn-decode 8b bs512 shared": (512, 1024, 512, 8, 32, 8),
        "attn-decode 0.6b bs1024 shared": (1024, 512, 256, 8, 16, 8),
        "attn-decode moe bs1": (1, 128, 384, 1, 32, 4),
    }.items():
        for casc in ((True, False) if n > 1 else (False,)):
            q, kc, vc, meta = paged(bsz, prompt, gen, n, hq, hk, 128, cascade=casc)
            t = bench(lambda: dec(q, kc, vc, meta, 128 ** -0.5))
            kv_tok = 2 * hk * 128 * 2
            need = (bsz // n * prompt + bsz * gen) * kv_tok if casc or n > 1 else bsz * (prompt + gen) * kv_tok
            rows.append((f"{name}{' cascade' if casc else ''}", t, need))
    moe = implementations("fused_moe")["triton"]
    route = implementations("moe_route")["triton"]
    e, h, i, k = 128, 2048, 768, 8
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) * 0.02
    for t_ in (1, 8, 64, 512, 1024, 8192):
        x = torch.randn(t_, h, device="cuda", dtype=torch.bfloat16)
        wts, ids = route(torch.randn(t_, e, device="cuda"), k, True)
        used = ids.unique().numel()
        need = used * 3 * h * i * 2 + 2 * t_ * h * 2
        rows.append((f"fused_moe T={t_} ({used} experts)", bench(lambda: moe(x, w13, w2, wts, ids)), need))
    rows += gpt_oss_rows()
    samp = implementations("sample")["triton"]
    for b in (1, 512, 1024):
        logits = torch.randn(b, 151936, device="cuda")
        meta = SamplingMetadata(
            temperature=torch.ones(b, device="cuda"), top_k=torch.zeros(b, dtype=torch.int64, device="cuda"),
            top_p=torch.ones(b, device="cuda"), min_p=torch.zeros(b, device="cuda"),
            seeds=torch.arange(b, device="cuda"), counters=torch.zeros(b, dtype=torch.int64, device="cuda"),
            raw_logprobs=torch.zeros(b, dtype=torch.bool, device="cuda"), banned_rows=None, banned_tokens=None,
            need_filter=False, all_greedy=False, any_raw=False, num_top_logprobs=0)
        rows.append((f"sample B={b}", bench(lambda: samp(logits, meta)), logits.numel() * 4))
        torch_samp = implementations("sample")["torch"]
        rows.append((f"sample B={b} (torch ref)", bench(lambda: torch_samp(logits, meta)), logits.numel() * 4))
    rows += penalty_rows()
    print(f"{'kernel':<42} {'us':>10} {'GB/s':>9} {'of copy bw':>10}")
    for name, t, need in rows:
        print(f"{name:<42} {t * 1e6:>10.1f} {need / t / 1e9:>9.0f} {need / t / bw:>10.1%}")


if __name__ == "__main__":
    main()
