"""ROCm AITER kernels behind the op registry (backend "aiter", preferred first on ROCm).

NEVER RUN: no AMD GPU was available; every call below was written from AITER's source (paths in
the comments) and vLLM's ROCm integration, and none has executed. Importing raises ImportError
unless `import aiter` works (then the registry skips this backend and ROCm uses triton -> torch).
Each wrapper checks the cases the AITER kernel supports and otherwise calls `_fallback(name)`
(the triton implementation, else torch).

Mapped:
  rms_norm                 aiter.rmsnorm2d_fwd
  fused_add_rms_norm       aiter.rmsnorm2d_fwd_with_add (out of place: x and residual untouched)
  silu_and_mul             aiter.silu_and_mul
  rotary_embedding         aiter.rope_cached_positions_2c_fwd (needs cos and sin as two contiguous
                           [max_pos, 1, 1, D/2] tables: split from the cos|sin cache once per cache
                           tensor and kept, not per call)
  paged_attention_prefill  aiter.flash_attn_varlen_func on the batch's own K/V (not the whole cache)
                           gathered into the packed [total_k, Hk, D] layout, as vLLM's ROCM_AITER_FA
                           backend does for cached context: one extra copy of those rows per layer,
                           small next to prefill attention but unmeasured. Its paged mode (block_table)
                           is not used: it needs blocks of a multiple of 128 tokens, and in the AITER
                           source read, the bf16 head-128 asm (v3) path accepts block_table but builds
                           its kernel arguments without it.
  paged_attention_decode   aiter.paged_attention_v1 with kv_cache_layout "NHD", which reads atom's
                           [num_blocks, block_size, Hk, D] cache as it is (gfx9 only; block 16/32,
                           head 64/128, GQA <= 16). The cascade groups are ignored (same maths).
  mla_attention_decode     aiter.mla.mla_decode_fwd, non-persistent split-KV path (stage 1: the asm
                           kernel of csrc/py_itfs_cu/asm_mla.cu from hsa/<gfx>/mla/mla_asm.csv; stage 2:
                           the Triton merge in aiter/mla.py), as vLLM's ROCM_AITER_MLA backend calls it:
                           q = [q_latent | q_pe], the cache viewed as pages of one token (a slot per
                           page), kv_indices = each sequence's token slots (atom/ops/aiter_args.py,
                           built on the device without a host sync, fixed size B x max_seq_len: graph
                           safe, built once per step for all layers), last page lengths 1, 16 KV splits.
                           gfx942 / gfx950, bf16 query and cache, 16 or 128 heads (vLLM's limit), latent
                           512 + rope 64 (DeepSeek's, the dims vLLM sends); anything else falls back. Only a
                           sequence's own slots are read (not "reads_whole_blocks"); cascade groups are
                           ignored (each sequence reads its shared prefix itself). The glue is tested on
                           CPU against a torch re-implementation of mla_decode_fwd's contract
                           (tests/test_aiter_args.py); the kernel call itself never ran.
Not mapped:
  fused_moe, moe_forward   Re-checked against AITER's source (aiter/fused_moe.py, aiter/ops/moe_op.py,
                           csrc/ck_gemm_moe_2stages_codegen/): there is no bf16 path for plain
                           [E, 2I, H] / [E, H, I] weights. The bf16 gate-up (g1u1) route is the CK
                           2-stage MoE (ck_moe_stage1_fwd / ck_moe_stage2_fwd), whose kernel is CK's
                           DeviceMoeGemm, a DeviceGemmMultipleDSplitKBPreShuffle: B must be pre-shuffled
                           (aiter.shuffle_weight). The weights' `is_shuffled` attribute has an unshuffled
                           kernel behind it for fp4 only ("a4w4_bns" in gemm_moe_ck2stages_common.py; the
                           a16w16 kernels are the same whatever the flag, and get_2stage_cfgs warns that
                           tuned kernels with is_shuffled=False "may produce incorrect results"); the
                           1-stage asm aiter.fmoe is bf16 g1u0 only (fused_moe_1stage_dict), with weights
                           vLLM shuffles too. atom keeps plain
                           weights that weight sync writes in place, and shuffling every call would copy
                           all expert weights each step. (AITER's Triton MoE kernels, aiter/ops/triton/moe,
                           take plain weights but are the same kind of kernel as atom's own triton one.)
  qkv_prologue             AITER's fused qk-norm/RoPE/cache kernels use other cache layouts and
                           signatures; the triton kernel does the whole prologue in one launch.
  kv_cache_write, linear, moe_route, sample, mla_cache_write, mla_attention_prefill, the GPT-OSS
  ops: not attempted (not in the AITER issue).
"""
from __future__ import annotations

import functools
import weakref

import torch

try:
    import aiter
except Exception as exc:  # pragma: no cover - depends on the machine
    raise ImportError(f"aiter is not usable: {exc}") from exc

from atom.ops.aiter_args import step_mla_decode_args, run_mla_decode
from atom.ops.metadata import AttentionMetadata
from atom.ops.registry import declare_backend, implementations, register

B = "aiter"
declare_backend(B, "graph_safe")
_HALF = (torch.bfloat16, torch.float16)


def _fallback(name: str):
    impls = implementations(name)
    return impls.get("triton") or impls["torch"]


@functools.lru_cache(maxsize=None)
def _gfx9(index: int) -> bool:
    return "gfx9" in torch.cuda.get_device_properties(index).gcnArchName


@register("rms_norm", B)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dim() == 2 and x.is_contiguous() and x.dtype in _HALF and weight.dtype == x.dtype:
        # aiter/ops/rmsnorm.py: rmsnorm2d_fwd(input, weight, epsilon) -> out
        return aiter.rmsnorm2d_fwd(x, weight, eps)
    return _fallback("rms_norm")(x, weight, eps)


@register("fused_add_rms_norm", B)
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if (x.dim() == 2 and x.is_contiguous() and residual.is_contiguous() and residual.shape == x.shape
            and x.dtype in _HALF and residual.dtype == x.dtype and weight.dtype == x.dtype):
        out, summed = torch.empty_like(x), torch.empty_like(x)
        # aiter/ops/rmsnorm.py: rmsnorm2d_fwd_with_add(out, input, residual_in, residual_out, weight, epsilon)
        aiter.rmsnorm2d_fwd_with_add(out, x, residual, summed, weight, eps)
        return out, summed
    return _fallback("fused_add_rms_norm")(x, residual, weight, eps)


@register("silu_and_mul", B)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_contiguous() and x.dtype in _HALF and x.numel() and x.shape[-1] % 2 == 0:
        out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
        # aiter/ops/activation.py: silu_and_mul(out [..., d], input [..., 2d]); gate first, fp32 math
        # (csrc/kernels/activation_kernels.cu act_and_mul_kernel)
        aiter.silu_and_mul(out, x)
        return out
    return _fallback("silu_and_mul")(x)


_cos_sin_split: dict[int, tuple] = {}


def _cos_sin(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos and sin of a [max_pos, D] cos|sin cache as contiguous [max_pos, 1, 1, D/2] tables (AITER's
    layout), made once per cache tensor and reused while it is alive and unmodified."""
    key = (cache.data_ptr(), cache._version)
    hit = _cos_sin_split.get(id(cache))
    if hit is not None and hit[0]() is cache and hit[1] == key:
        return hit[2], hit[3]
    if cache.is_cuda and torch.cuda.is_current_stream_capturing():
        return None  # a copy made under capture would only be filled when the graph replays
    half = cache.shape[-1] // 2
    cos, sin = (t.contiguous().view(cache.shape[0], 1, 1, half) for t in cache.split(half, dim=-1))
    ref = weakref.ref(cache, lambda _, k=id(cache): _cos_sin_split.pop(k, None))
    _cos_sin_split[id(cache)] = (ref, key, cos, sin)
    return cos, sin


@register("rotary_embedding", B)
def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    t, d = q.shape[0], q.shape[-1]
    tables = None
    if interleaved:  # AITER's GPT-J style keeps the pairs in place; ours de-interleaves (as HF)
        return _fallback("rotary_embedding")(positions, q, k, cos_sin_cache, interleaved=True)
    if (t and q.dtype in _HALF and k.dtype == q.dtype and cos_sin_cache.shape[-1] == d
            and positions.shape == (t,) and positions.dtype == torch.int64 and positions.is_contiguous()):
        tables = _cos_sin(cos_sin_cache)
    if tables is None:
        return _fallback("rotary_embedding")(positions, q, k, cos_sin_cache)
    # aiter/ops/rope.py: rope_cached_positions_2c_fwd(input_x, input_y, cos, sin, positions, rotate_style,
    # reuse_freqs_front_part, nope_first) -> (out_x, out_y), out of place; inputs "sbhd" [s, b, h, d] with any
    # strides, positions [s, b] int64; rotate_style 0 = neox; reuse_freqs_front_part: cos/sin hold D/2 columns.
    # csrc/kernels/rope/pos_fwd_kernels.cu: grid (s, b), cos read at pos * D/2 (contiguous); fp32 cos with
    # bf16/fp16 input is in the dispatch table (rope_common.h), math in fp32.
    qo, ko = aiter.rope_cached_positions_2c_fwd(q.unsqueeze(1), k.unsqueeze(1), *tables, positions.view(t, 1),
                                                0, True, False)
    return qo.squeeze(1), ko.squeeze(1)


@register("paged_attention_prefill", B)
def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    d = q.shape[-1]
    if not (q.dtype in _HALF and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and d <= 256 and d % 8 == 0 and q.shape[1] % k_cache.shape[2] == 0):
        return _fallback("paged_attention_prefill")(q, k_cache, v_cache, meta, scale)
    # Gather each sequence's seq_lens[b] K/V rows (cached prefix + new tokens, already in the cache),
    # sequence after sequence: the packed layout flash_attn_varlen_func takes.
    bs = k_cache.shape[1]
    pos = torch.arange(meta.max_seq_len, device=q.device)
    slots = meta.block_tables[:, pos // bs] * bs + pos % bs
    rows = slots[pos[None, :] < meta.seq_lens[:, None]]
    k = k_cache.view(-1, *k_cache.shape[2:])[rows]
    v = v_cache.view(-1, *v_cache.shape[2:])[rows]
    cu_k = torch.nn.functional.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
    # aiter/ops/mha.py: flash_attn_varlen_func(q [total_q, Hq, D], k, v [total_k, Hk, D], cu_seqlens_q,
    # cu_seqlens_k (int32 [B+1]), max_seqlen_q, max_seqlen_k, ..., softmax_scale, causal); causal is aligned
    # to the bottom right (each sequence's queries are its last tokens), GQA by Hq % Hk.
    # csrc/py_itfs_ck/mha_varlen_fwd_kernels.cu: fp16/bf16, head dim <= 256 and % 8.
    out = aiter.flash_attn_varlen_func(
        q=q, k=k, v=v, cu_seqlens_q=meta.query_start_loc.to(torch.int32), cu_seqlens_k=cu_k,
        max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len, softmax_scale=scale, causal=True)
    return out[0] if isinstance(out, tuple) else out  # older AITER returns a 1-tuple


@register("paged_attention_decode", B)
def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    num_seqs, heads, d = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    # The limits vLLM's use_rocm_custom_paged_attention puts on this kernel (paged_attention_ll4mi).
    if not (q.is_cuda and _gfx9(q.device.index or 0) and q.dtype in _HALF and k_cache.dtype == q.dtype
            and v_cache.dtype == q.dtype and d in (64, 128) and block_size in (16, 32)
            and heads % kv_heads == 0 and heads // kv_heads <= 16 and 0 < meta.max_seq_len <= 128 * 1024
            and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1):
        return _fallback("paged_attention_decode")(q, k_cache, v_cache, meta, scale)
    q = q.contiguous()
    out = torch.empty_like(q)
    partitions = -(-meta.max_seq_len // 256)
    workspace = torch.empty(num_seqs * heads * partitions * (d * q.element_size() + 8), dtype=torch.uint8,
                            device=q.device)
    one = torch.ones(1, dtype=torch.float32, device=q.device)  # k/v scales: read only for fp8 caches
    # aiter/ops/attention.py: paged_attention_v1(out, workspace_buffer, query, key_cache, value_cache, scale,
    # block_tables, cu_query_lens, context_lens, max_context_len, alibi_slopes, kv_cache_dtype, kv_cache_layout,
    # logits_soft_cap, k_scale, v_scale); csrc/cpp_itfs/pa/pa_v1.py: "NHD" = [num_blocks, block_size, Hk, D],
    # int32 tables and lengths; pa_v1.cpp.jinja: workspace = exp_sums, max_logits (fp32) then partial outputs
    # (query dtype), each [num_seqs, heads, partitions(, D)], partitions of 256 tokens; pa_v1.cuh: a row with
    # context length 0 (a padded CUDA-graph row) gets zeros.
    aiter.paged_attention_v1(
        out, workspace, q, k_cache, v_cache, scale, meta.block_tables.to(torch.int32),
        meta.query_start_loc.to(torch.int32), meta.seq_lens.to(torch.int32), meta.max_seq_len,
        None, "auto", "NHD", 0.0, one, one)
    return out


# ---- MLA decode (DeepSeek-V3 / Moonlight) -----------------------------------------------------

MLA_KV_SPLITS = 16  # split-KV parts per sequence: what vLLM's ROCM_AITER_MLA passed before AITER chose them
_MLA_HEADS = (16, 128)  # the head counts vLLM's ROCM_AITER_MLA accepts (AiterMLAImpl asserts them)


@functools.lru_cache(maxsize=None)
def _mla_kernel():
    """aiter.mla.mla_decode_fwd, or None where this AITER has no aiter.mla."""
    try:
        from aiter.mla import mla_decode_fwd
    except Exception:  # pragma: no cover - depends on the AITER build
        return None
    return mla_decode_fwd


@functools.lru_cache(maxsize=None)
def _mla_arch(index: int) -> bool:
    # hsa/gfx942/mla/mla_asm.csv and hsa/gfx950/mla/mla_asm.csv hold the bf16 decode kernels.
    return torch.cuda.get_device_properties(index).gcnArchName.split(":")[0] in ("gfx942", "gfx950")


@register("mla_attention_decode", B)
def mla_attention_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float) -> torch.Tensor:
    batch, heads, lat = q_latent.shape
    rope = q_pe.shape[-1]
    kernel = _mla_kernel()
    # aiter/mla.py mla_decode_fwd, non-persistent path (work_meta_data None): stage 1 is the asm
    # kernel (csrc/py_itfs_cu/asm_mla.cu mla_decode_stage1_asm_fwd), picked from hsa/<gfx>/mla/mla_asm.csv
    # by (bf16, bf16, heads, max_seqlen_q 1): binaries written for DeepSeek's latent 512 + rope 64 (the only
    # dims vLLM sends them; their code cannot be read here, so no other width is tried).
    if not (kernel is not None and q_latent.is_cuda and _mla_arch(q_latent.device.index or 0) and batch
            and heads in _MLA_HEADS and lat == 512 and rope == 64 and q_latent.dtype == torch.bfloat16
            and q_pe.dtype == torch.bfloat16 and kv_cache.dtype == torch.bfloat16
            and tuple(kv_cache.shape[2:]) == (1, lat + rope) and kv_cache.is_contiguous()):
        return _fallback("mla_attention_decode")(q_latent, q_pe, kv_cache, meta, scale)
    args = step_mla_decode_args(meta, kv_cache.shape[1], MLA_KV_SPLITS)
    return run_mla_decode(kernel, q_latent, q_pe, kv_cache, meta, scale, args, MLA_KV_SPLITS)
