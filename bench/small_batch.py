"""Micro-benchmarks of the small-batch decode kernels (the decode-moe-bs1 workload: one token,
Qwen3-30B-A3B shapes): `python -m bench.small_batch`. Each section times the fused / specialised
kernel against the path it replaces, inside a CUDA graph (launch overhead out), and prints
microseconds and the share of the copy bandwidth for the bytes the kernel must move."""
from __future__ import annotations

import torch
import triton

from bench.timing import graph_of

COPY_BW = 4.25e12  # bytes read + written per s, measured on the H200 (BENCHMARKS.md)


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn, replayed `reps` times inside one CUDA graph."""
    g = graph_of(fn, reps)
    return triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median") / 1e3 / reps


def report(name: str, seconds: float, nbytes: int | None = None) -> None:
    frac = f"  {nbytes / seconds / COPY_BW:6.1%} of copy bw" if nbytes else ""
    print(f"{name:<60} {seconds * 1e6:8.1f} us{frac}", flush=True)


SECTIONS = []  # functions taking no arguments; each prints its rows


# ---- sections (one per kernel family; add yours below its own marker) ----

# [moe-small]

def moe_small_section() -> None:
    """moe_forward (routing + experts) vs moe_route + fused_moe at Qwen3-30B-A3B shapes (bf16,
    E=128, H=2048, I=768, top-8, renormalised), small path forced on / off through SMALL_T_MAX,
    T = 1..16; then candidate tile configs of the small path at T=1 (pick SMALL_CFG / SMALL_T_MAX).
    Successive calls cycle over LAYERS copies of the weights, as decode does over layers: the 75 MB
    of one token's experts would otherwise stay in the 60 MB L2 from one replay to the next."""
    from atom.ops import implementations
    from atom.ops.triton import moe_small as moe

    e, h, inter, k, dtype, dev, layers = 128, 2048, 768, 8, torch.bfloat16, "cuda", 4
    torch.manual_seed(0)
    weights = [(torch.randn(e, 2 * inter, h, dtype=dtype, device=dev) * 0.02,
                torch.randn(e, h, inter, dtype=dtype, device=dev) * 0.02) for _ in range(layers)]
    expert_bytes = (weights[0][0][0].numel() + weights[0][1][0].numel()) * weights[0][0].element_size()
    route, fused = implementations("moe_route")["triton"], implementations("fused_moe")["triton"]
    forward = implementations("moe_forward")["triton"]

    def cycling(call):
        step = [0]

        def fn():
            w13, w2 = weights[step[0] % layers]
            step[0] += 1
            return call(w13, w2)
        return fn

    saved = moe.SMALL_T_MAX
    print(f"-- moe-small: E={e} H={h} I={inter} top-{k} bf16, {layers} layers' weights in turn "
          f"(SMALL_T_MAX={saved}, SMALL_CFG={moe.SMALL_CFG})")
    try:
        for t in (1, 2, 4, 8, 16):
            x = torch.randn(t, h, dtype=dtype, device=dev)
            logits = torch.randn(t, e, dtype=dtype, device=dev)
            nbytes = route(logits, k, True)[1].unique().numel() * expert_bytes
            report(f"moe T={t}: moe_route + fused_moe",
                   graph_time(cycling(lambda w13, w2: fused(x, w13, w2, *route(logits, k, True)))), nbytes)
            for small in (True, False):
                moe.SMALL_T_MAX = 1 << 30 if small else 0
                report(f"moe T={t}: moe_forward, small path {'on' if small else 'off'}",
                       graph_time(cycling(lambda w13, w2: forward(x, logits, w13, w2, k, True))), nbytes)
        x = torch.randn(1, h, dtype=dtype, device=dev)
        logits = torch.randn(1, e, dtype=dtype, device=dev)
        nbytes = k * expert_bytes
        ref = fused(x, *weights[0], *route(logits, k, True))

        def tiles(bn, bk, warps, stages):
            return dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)

        candidates = [
            dict(up=moe.SMALL_CFG["up"], down=moe.SMALL_CFG["down"]),
            dict(up=tiles(32, 128, 4, 3), down=tiles(4, 256, 4, 2)),
            dict(up=tiles(64, 128, 4, 4), down=tiles(8, 128, 4, 2)),
            dict(up=tiles(16, 128, 4, 4), down=tiles(16, 256, 8, 2)),
            dict(up=tiles(16, 256, 4, 2), down=tiles(8, 256, 8, 2)),
        ]
        for c in candidates:
            got = moe.moe_small(x, logits, *weights[0], k, True, cfg=c)[0]
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            u, d = c["up"], c["down"]
            name = (f"moe T=1 up {u['BLOCK_N']}/{u['BLOCK_K']}/w{u['num_warps']}s{u['num_stages']} "
                    f"down {d['BLOCK_N']}/{d['BLOCK_K']}/w{d['num_warps']}s{d['num_stages']}")
            report(f"{name} err {err:.0e}",
                   graph_time(cycling(lambda w13, w2: moe.moe_small(x, logits, w13, w2, k, True, cfg=c))), nbytes)
            for part, cfg_part in (("up", u), ("down", d)):
                act = torch.empty(k, inter, dtype=dtype, device=dev)
                tw = torch.empty(1, k, dtype=torch.float32, device=dev)
                tid = torch.empty(1, k, dtype=torch.int32, device=dev)
                out = torch.empty(1, h, dtype=dtype, device=dev)
                moe.small_up(x, logits, weights[0][0], act, tw, tid, k, True, u)
                if part == "up":
                    fn = cycling(lambda w13, w2: moe.small_up(x, logits, w13, act, tw, tid, k, True, cfg_part))
                    part_bytes = nbytes * 2 // 3
                else:
                    fn = cycling(lambda w13, w2: moe.small_down(act, w2, tw, tid, out, k, cfg_part))
                    part_bytes = nbytes // 3
                report(f"    kernel {part} alone", graph_time(fn), part_bytes)
    finally:
        moe.SMALL_T_MAX = saved


SECTIONS.append(moe_small_section)

# [attn-prologue]

def attn_prologue() -> None:
    """q/k RMSNorm + RoPE + KV-cache write after the qkv GEMM, Qwen3-30B-A3B (Hq 32, Hk 4, D 128,
    bf16): the four separate triton kernels vs the fused `qkv_prologue` (auto tiling, then each
    heads-per-program for tuning QKV_PROLOGUE_MAX_PROGRAMS)."""
    from atom.models.layers.rotary import RotaryEmbedding
    from atom.ops import implementations
    from atom.ops.triton import elementwise as ew

    hq, hk, d, page, dt, dev = 32, 4, 128, 16, torch.bfloat16, "cuda"
    tri = {name: implementations(name)["triton"]
           for name in ("rms_norm", "rotary_embedding", "kv_cache_write", "qkv_prologue")}
    cs = RotaryEmbedding(d, 40960, 1e6).cos_sin_cache.to(dev)
    qw = (1 + 0.1 * torch.randn(d, device=dev)).to(dt)
    kw = (1 + 0.1 * torch.randn(d, device=dev)).to(dt)
    for t in (1, 64, 512):
        blocks = 4096
        kc = torch.randn(blocks, page, hk, d, device=dev).to(dt)
        vc = torch.randn(blocks, page, hk, d, device=dev).to(dt)
        qkv = torch.randn(t, (hq + 2 * hk) * d, device=dev).to(dt)
        pos = torch.randint(0, 40960, (t,), device=dev)
        slots = torch.randperm(blocks * page, device=dev)[:t]
        # Read qkv, write q and k/v rows (cos/sin and weights are small next to these).
        nbytes = 2 * t * (hq + 2 * hk) * d * qkv.element_size()

        def old():
            q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
            q, k, v = q.reshape(t, hq, d), k.reshape(t, hk, d), v.reshape(t, hk, d)
            q, k = tri["rms_norm"](q, qw, 1e-6), tri["rms_norm"](k, kw, 1e-6)
            q, k = tri["rotary_embedding"](pos, q, k, cs)
            tri["kv_cache_write"](k, v, kc, vc, slots)
            return q

        def fused():
            return tri["qkv_prologue"](qkv, pos, cs, qw, kw, 1e-6, hq, hk, d, kc, vc, slots)

        auto = ew.qkv_prologue_heads_per_program(t, hq + 2 * hk)
        report(f"attn prologue T={t}: rms_norm q,k + rope + kv write (4 kernels)", graph_time(old), nbytes)
        report(f"attn prologue T={t}: qkv_prologue fused (auto, {auto} heads/program)", graph_time(fused), nbytes)
        for bh in (1, 2, 4, 8, 16):
            report(f"attn prologue T={t}:   fused, {bh} heads/program",
                   graph_time(lambda: ew.qkv_prologue_launch(qkv, pos, cs, qw, kw, 1e-6, hq, hk, d, kc, vc, slots,
                                                             heads_per_program=bh)), nbytes)

        def old_no_norm():  # Llama: no q/k norm
            q, k, v = qkv.split([hq * d, hk * d, hk * d], -1)
            q, k = tri["rotary_embedding"](pos, q.reshape(t, hq, d), k.reshape(t, hk, d), cs)
            tri["kv_cache_write"](k, v.reshape(t, hk, d), kc, vc, slots)
            return q

        report(f"attn prologue T={t}: no norm, rope + kv write (2 kernels)", graph_time(old_no_norm), nbytes)
        report(f"attn prologue T={t}: no norm, qkv_prologue fused",
               graph_time(lambda: tri["qkv_prologue"](qkv, pos, cs, None, None, 1e-6, hq, hk, d, kc, vc, slots)),
               nbytes)


SECTIONS.append(attn_prologue)

# [sampling-small]

def sampling_small() -> None:
    """The sampler (triton `sample`) at small batch, vocabulary 151,936, fp32 logits (what a bf16 LM
    head's logits become), token logprobs on (processed; raw too on the "+raw" rows): the
    one-program-per-row kernel against the vocabulary-split path (`sample` splits below
    SPLIT_BELOW_ROWS = 256 rows; 256 shows the edge). Bytes: the logits, read once."""
    from atom.ops.metadata import SamplingMetadata
    from atom.ops.triton import sampling

    vocab, dev = 151936, torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    for rows in (1, 4, 16, 64, 256):
        logits = torch.randn(rows, vocab, device=dev, generator=gen) * 3
        temps = torch.tensor([1.0, 0.7, 0.0, 1.3] * rows, device=dev)[:rows]
        for raw_rows in (False, True):
            raw = torch.arange(rows, device=dev) % 2 == (0 if raw_rows else 2)  # even rows, or none
            meta = SamplingMetadata(
                temperature=temps, top_k=torch.zeros(rows, dtype=torch.int64, device=dev),
                top_p=torch.ones(rows, device=dev), min_p=torch.zeros(rows, device=dev),
                seeds=torch.arange(rows, device=dev) * 7919 + 1,
                counters=torch.full((rows,), 12345, device=dev),
                raw_logprobs=raw, banned_rows=None, banned_tokens=None, need_filter=False,
                all_greedy=False, any_raw=raw_rows, num_top_logprobs=0)
            for split in (False, True):
                seconds = graph_time(lambda split=split: sampling.sample(logits, meta, split=split))
                path = "split" if split else "one program/row"
                name = f"sample rows={rows}{' +raw' if raw_rows else ''} {path}"
                report(name, seconds, logits.numel() * logits.element_size())


SECTIONS.append(sampling_small)

# [skinny-gemm]

def skinny_gemm() -> None:
    """Dense layers at decode batch, Qwen3-30B-A3B shapes, bf16: F.linear (cuBLAS) against the triton
    `linear` op's skinny kernel (atom/ops/triton/linear.py) at M = 1, 2, 4, 8, then other tile
    configs at M = 1 (to re-pick skinny_config). Each call in the graph reads another copy of the
    weight, ~150 MB of copies in all (> 2x the L2), as a model's layers do. Bytes: the weight.
    Rows marked "*" are what the op runs (use_skinny, SKINNY_LARGE_M_MAX, SKINNY_M_MAX)."""
    import itertools

    import torch.nn.functional as F

    from atom.ops.triton import linear as sk

    dev, dt = "cuda", torch.bfloat16
    shapes = {"qkv_proj": (5120, 2048), "o_proj": (2048, 4096), "router gate": (128, 2048)}
    for name, (n, k) in shapes.items():
        nbytes = n * k * 2
        copies = max(2, min(320, -(-150_000_000 // nbytes)))
        ws = [torch.randn(n, k, device=dev).to(dt) for _ in range(copies)]
        reps = max(20, copies)
        default = sk.skinny_config(n, k, 2, sk._num_sms(torch.device(dev)))

        def timed(m, f):
            x = torch.randn(m, k, device=dev).to(dt)
            it = itertools.cycle(ws)
            return graph_time(lambda: f(x, next(it)), reps=reps)

        for m in (1, 2, 4, 8):
            mark = "*" if sk.use_skinny(m, n, k, 2) else " "
            report(f"linear {name} N={n} K={k} M={m}: {' ' if mark == '*' else '*'}F.linear",
                   timed(m, lambda x, w: F.linear(x, w)), nbytes)
            cfg = " ".join(f"{key}={v}" for key, v in default.items())
            report(f"linear {name} N={n} K={k} M={m}: {mark}triton {cfg}",
                   timed(m, lambda x, w: sk.skinny_linear(x, w)), nbytes)
        bn, bk, nw = default["block_n"], default["block_k"], default["num_warps"]
        others = [dict(block_n=bn * 2, block_k=bk, split_k=1, num_warps=nw),
                  dict(block_n=max(1, bn // 2), block_k=bk, split_k=1, num_warps=nw),
                  dict(block_n=bn, block_k=min(2 * bk, triton.next_power_of_2(k)), split_k=1,
                       num_warps=min(8, 2 * nw)),
                  dict(block_n=bn, block_k=max(256, bk // 2), split_k=2, num_warps=max(1, nw // 2))]
        for cfg in others:
            label = " ".join(f"{key}={v}" for key, v in cfg.items())
            report(f"linear {name} N={n} K={k} M=1:  triton {label}",
                   timed(1, lambda x, w, cfg=cfg: sk.skinny_linear(x, w, None, cfg)), nbytes)
        del ws


SECTIONS.append(skinny_gemm)


def main() -> None:
    import atom.ops.triton  # noqa: F401  (registers the triton ops)
    for section in SECTIONS:
        section()


if __name__ == "__main__":
    main()
