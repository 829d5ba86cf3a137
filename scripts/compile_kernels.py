"""Compile (never run) the Triton kernels of the GPT-OSS family ops for an H200 (sm_90) on a
machine without a GPU, at GPT-OSS-20B's and the tiny test model's shapes: catches what Triton's
interpreter does not (compile errors, shared memory over the limit) before device time is spent.

    PYTHONPATH=$PWD:/work/triton_pkgs .venv/bin/python scripts/compile_kernels.py

Every kernel launch compiles the launch's exact specialisation down to a cubin (ptxas) and
returns without launching: tensors are CPU tensors whose contents are never read. Prints each
kernel's launches and the largest shared-memory use. Needs Triton (not a dependency of atom).
"""
from __future__ import annotations

import collections

import torch

H200_SHARED = 232448  # bytes of shared memory a block may use on sm_90


def _compile_only() -> list[tuple[str, int]]:
    """Make every JIT launch compile for sm_90 and return; returns the list it appends
    (kernel name, shared bytes) to."""
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
        compiled.append((self.fn.__name__, kernel.metadata.shared))
        return kernel
    JITFunction.run = compile_only
    return compiled


def _attention(impl) -> None:
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

    decode, prefill = impl("sliding_sink_attention_decode")["triton"], impl("sliding_sink_attention_prefill")["triton"]
    for dt in (torch.bfloat16, torch.float32):
        for hq, hk, d, page in ((64, 8, 64, 16), (4, 2, 16, 16)):  # GPT-OSS-20B, the tiny test model
            kc = torch.empty(300, page, hk, d, dtype=dt)
            sinks = torch.empty(hq, dtype=dt)
            for window in (None, 128):
                for b in (1, 16, 256):  # split + merge, one split per window, whole own parts
                    for cascade in (False, True):
                        decode(torch.empty(b, hq, d, dtype=dt), kc, kc, meta(b, cascade=cascade), 0.125, window, sinks)
                for qlen in (7, 100):
                    prefill(torch.empty(2 * qlen, hq, d, dtype=dt), kc, kc, meta(2, qlen), 0.125, window, sinks)


def _experts(impl) -> None:
    op = impl("fused_moe_biased")["triton"]
    e, h, i, k = 32, 2880, 2880, 4  # GPT-OSS-20B
    for dt in (torch.bfloat16, torch.float32):
        w13, b13 = torch.empty(e, 2 * i, h, dtype=dt), torch.empty(e, 2 * i, dtype=dt)
        w2, b2 = torch.empty(e, h, i, dtype=dt), torch.empty(e, h, dtype=dt)
        for t in (1, 4, 5, 64, 700, 4096):  # the small path, then the aligned one's tile configs
            x, weights, ids = torch.empty(t, h, dtype=dt), torch.empty(t, k), torch.zeros(t, k, dtype=torch.int64)
            for down_bias in (b2, None):
                op(x, w13, b13, w2, down_bias, weights, ids, 7.0, 1.702)


def main() -> None:
    compiled = _compile_only()
    from atom.ops import implementations
    import atom.ops.triton  # noqa: F401 (registers the triton ops)
    _attention(implementations)
    _experts(implementations)
    counts = collections.Counter(name for name, _ in compiled)
    for name, n in sorted(counts.items()):
        shared = max(s for k, s in compiled if k == name)
        print(f"{name:<28} {n:>4} launches compiled, max shared memory {shared:>7} B")
    worst = max(s for _, s in compiled)
    print(f"{len(compiled)} launches compiled for sm_90; largest shared memory {worst} B of {H200_SHARED}")
    if worst > H200_SHARED:
        raise SystemExit("a kernel needs more shared memory than an H200 block has")


if __name__ == "__main__":
    main()
