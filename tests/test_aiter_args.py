"""The AITER MLA decode glue (atom/ops/aiter_args.py) without AITER: the page lists it builds from
atom's metadata go through a torch re-implementation of `aiter.mla.mla_decode_fwd`'s documented
semantics (each query attends over kv_buffer's pages kv_indices[kv_indptr[b]:kv_indptr[b+1]], the
last holding kv_last_page_lens[b] tokens; the latent part is the value) and must match atom's
torch reference mla_attention_decode on fresh random inputs."""
from __future__ import annotations

import pytest
import torch

from atom.ops.aiter_args import MlaDecodeArgs, mla_decode_args, run_mla_decode, step_mla_decode_args
from atom.ops.metadata import AttentionMetadata
from atom.ops.torch_family_ops import mla_attention_decode

SPLITS = 16


def reference_mla_decode_fwd(q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                             page_size=1, nhead_kv=1, sm_scale=None, num_kv_splits=None, num_kv_splits_indptr=None):
    """mla_decode_fwd's contract in plain torch (float64): q [total_q, H, L + R], kv_buffer
    [num_pages, page_size, 1, L + R], o [total_q, H, L] written in place. Checks the index formats
    the kernel relies on (it would read out of bounds, not raise)."""
    num_pages, width = kv_buffer.shape[0], kv_buffer.shape[-1]
    lat = o.shape[-1]
    batch = qo_indptr.numel() - 1
    assert kv_buffer.shape[1:3] == (page_size, nhead_kv) and nhead_kv == 1
    for t in (qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, num_kv_splits_indptr):
        assert t.dtype == torch.int32
    assert torch.equal(num_kv_splits_indptr, torch.arange(batch + 1, dtype=torch.int32) * num_kv_splits)
    assert kv_indptr[0] == 0 and bool((kv_indptr[1:] >= kv_indptr[:-1]).all()) and kv_indptr[-1] <= kv_indices.numel()
    rows = kv_buffer.reshape(num_pages, page_size, width).double()
    for b in range(batch):
        pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]].long()
        last = int(kv_last_page_lens[b])
        assert pages.numel() > 0 and 1 <= last <= page_size
        assert bool((pages >= 0).all()) and bool((pages < num_pages).all())
        kv = rows[pages].reshape(-1, width)[:(pages.numel() - 1) * page_size + last]
        qs, qe = int(qo_indptr[b]), int(qo_indptr[b + 1])
        assert qe - qs == max_seqlen_q
        scores = torch.einsum("qhd,kd->qhk", q[qs:qe].double(), kv) * sm_scale
        o[qs:qe] = torch.einsum("qhk,kl->qhl", scores.softmax(-1), kv[:, :lat]).to(o.dtype)
    return o.view(batch, 1, *o.shape[1:]), None


def decode_batch(lengths, block_size, heads=3, lat=24, rope=8, shared=(), pad_rows=0, seed=0):
    """Random cache and queries; shuffled block tables where each (rows, blocks) of `shared` makes
    those rows share their first blocks (the n samples of a prompt); pad_rows rows of length 0."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + 5
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(n)] for n in need]
    for rows, nb in shared:
        for r in rows[1:]:
            tables[r][:nb] = tables[rows[0]][:nb]
    tables += [[perm[0]]] * pad_rows  # a padded row's table holds some stale block
    lengths = list(lengths) + [0] * pad_rows
    width = max(need) + 1  # a wider table than needed, as the CUDA-graph runner's
    meta = AttentionMetadata(
        slot_mapping=torch.full((len(lengths),), -1), query_start_loc=torch.arange(len(lengths) + 1),
        seq_lens=torch.tensor(lengths, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        is_decode=True, max_query_len=1, max_seq_len=max(lengths))
    cache = torch.randn(num_blocks, block_size, 1, lat + rope, generator=g)
    q_latent = torch.randn(len(lengths), heads, lat, generator=g) * 0.5
    q_pe = torch.randn(len(lengths), heads, rope, generator=g)
    return q_latent, q_pe, cache, meta, (lat + rope) ** -0.5


CASES = [
    dict(lengths=[5, 9, 11, 1, 14], block_size=4),
    dict(lengths=[7, 10, 13, 6], block_size=4, shared=[([0, 1, 2], 1)]),  # shared prefix, then own blocks
    dict(lengths=[33, 35, 40, 17, 16], block_size=16, shared=[([0, 1, 2], 2), ([3, 4], 1)], pad_rows=2),
    dict(lengths=[3], block_size=1),
]


@pytest.mark.parametrize("case", CASES)
def test_glue_matches_torch_reference(case):
    q_latent, q_pe, cache, meta, scale = decode_batch(**case)
    args = mla_decode_args(meta.block_tables, meta.seq_lens, cache.shape[1], meta.max_seq_len, SPLITS)
    out = run_mla_decode(reference_mla_decode_fwd, q_latent, q_pe, cache, meta, scale, args, SPLITS)
    real = meta.seq_lens > 0
    ref = mla_attention_decode(q_latent, q_pe, cache, meta, scale)
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))  # padded rows: zeros, never NaN
    # The packed lists hold exactly each sequence's slots, in order.
    bs = cache.shape[1]
    for b, n in enumerate(meta.seq_lens.tolist()):
        lo, hi = int(args.kv_indptr[b]), int(args.kv_indptr[b + 1])
        want = [int(meta.block_tables[b, p // bs]) * bs + p % bs for p in range(max(n, 1))]
        assert args.kv_indices[lo:hi].tolist() == want


def test_reference_catches_an_off_by_one():
    """The comparison above is sharp enough to see a page list one token short or one too long,
    and last-page lengths set to the sequence length (old vLLM's page-size-1 convention)."""
    q_latent, q_pe, cache, meta, scale = decode_batch([6, 9, 13], 4)
    ref = mla_attention_decode(q_latent, q_pe, cache, meta, scale)
    good = mla_decode_args(meta.block_tables, meta.seq_lens, 4, meta.max_seq_len, SPLITS)
    short = mla_decode_args(meta.block_tables, meta.seq_lens - 1, 4, meta.max_seq_len, SPLITS)
    long = mla_decode_args(meta.block_tables, meta.seq_lens + 1, 4, meta.max_seq_len + 1, SPLITS)
    torch.testing.assert_close(run_mla_decode(reference_mla_decode_fwd, q_latent, q_pe, cache, meta, scale, good,
                                              SPLITS), ref, atol=1e-5, rtol=1e-5)
    for bad in (short, long):
        out = run_mla_decode(reference_mla_decode_fwd, q_latent, q_pe, cache, meta, scale, bad, SPLITS)
        assert not torch.allclose(out, ref, atol=1e-3, rtol=1e-3)
    wrong_last = MlaDecodeArgs(**{**vars(good), "kv_last_page_lens": meta.seq_lens.to(torch.int32)})
    with pytest.raises(AssertionError):
        run_mla_decode(reference_mla_decode_fwd, q_latent, q_pe, cache, meta, scale, wrong_last, SPLITS)


def test_shapes_do_not_depend_on_values():
    """CUDA-graph safety: the lists' shapes come from the batch, the table width, the block size
    and max_seq_len only, and the construction runs on the meta device (no value is read)."""
    _, _, cache, meta, _ = decode_batch([5, 9, 11], 4)
    a = mla_decode_args(meta.block_tables, meta.seq_lens, 4, 16, SPLITS)
    b = mla_decode_args(meta.block_tables.flip(0), torch.tensor([1, 16, 0], dtype=torch.int32), 4, 16, SPLITS)
    on_meta = mla_decode_args(meta.block_tables.to("meta"), meta.seq_lens.to("meta"), 4, 16, SPLITS)
    for x, y, z in zip(vars(a).values(), vars(b).values(), vars(on_meta).values()):
        assert x.shape == y.shape == z.shape and x.dtype == y.dtype == z.dtype == torch.int32


def test_step_args_built_once_and_rebuilt_after_an_update():
    """Every layer of a step shares one build; the CUDA-graph runner's in-place rewrite of the
    same metadata (the next step) gets fresh lists."""
    _, _, _, meta, _ = decode_batch([5, 9, 11], 4)
    first = step_mla_decode_args(meta, 4, SPLITS)
    assert step_mla_decode_args(meta, 4, SPLITS) is first
    meta.seq_lens.copy_(torch.tensor([6, 10, 12], dtype=torch.int32))  # next step, same tensors
    second = step_mla_decode_args(meta, 4, SPLITS)
    assert second is not first and second.kv_indptr.tolist() == [0, 6, 16, 28]
    meta.block_tables[0, 0] = 7
    assert step_mla_decode_args(meta, 4, SPLITS).kv_indices[0] == 28
