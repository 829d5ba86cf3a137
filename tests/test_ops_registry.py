"""The ops registry: per-device choice, per-op overrides, clear errors."""
from __future__ import annotations

import pytest
import torch

from atom.ops import OpTable, implementations


def test_cpu_prefers_the_cpu_backend_then_the_torch_reference():
    table = OpTable()
    table.configure(torch.device("cpu"))
    assert set(table.backend_of.values()) == {"cpu", "torch"}
    for name, backend in table.backend_of.items():
        assert backend == ("cpu" if "cpu" in implementations(name) else "torch"), name
    table.configure(torch.device("cpu"), {"linear": "torch", "paged_attention_decode": "torch"})
    assert table.backend_of["linear"] == table.backend_of["paged_attention_decode"] == "torch"
    for name in ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "kv_cache_write", "paged_attention_prefill",
                 "paged_attention_decode", "silu_and_mul", "moe_route", "fused_moe", "sample"):
        assert "torch" in implementations(name)
        assert callable(getattr(table, name))


def test_unknown_override_and_op_are_clear_errors():
    table = OpTable()
    with pytest.raises(ValueError, match="unknown op"):
        table.configure(torch.device("cpu"), {"no_such_op": "torch"})
    with pytest.raises(ValueError, match="has no backend 'nonexistent'"):
        table.configure(torch.device("cpu"), {"rms_norm": "nonexistent"})
    with pytest.raises(AttributeError, match="no op named"):
        table.no_such_op


def test_callers_ask_capabilities_not_backend_names():
    from atom.ops import ops
    from atom.ops.registry import OpTable
    table = OpTable()  # CPU: the cpu backend, then the torch reference
    assert table.supports("paged_attention_decode", "reads_whole_blocks")
    assert not table.supports("paged_attention_decode", "cascade")
    assert not table.supports("qkv_prologue", "graph_safe")
    assert table.supports("fused_moe", "skips_negative_ids")
    assert not table.supports("no_such_op", "graph_safe")
    with pytest.raises(ValueError, match="unknown capability"):
        ops.supports("fused_moe", "fast")


def test_low_precision_logits_is_the_triton_samplers_alone():
    """The GPU decode path hands bf16 logits to the sampler only when the chosen sampler declares
    low_precision_logits (the Triton one reads them widening each load); every CPU backend keeps
    the float32 logits, and widen=False gives the same values in the model's dtype."""
    import torch

    from atom.ops import ops
    from atom.ops.registry import capabilities
    for backend in _backends("sample") - {"triton"}:
        assert "low_precision_logits" not in capabilities("sample", backend)
    ops.configure(torch.device("cpu"), {})
    assert not ops.supports("sample", "low_precision_logits")
    from atom.models.layers.embedding import LMHead
    head = LMHead(50, 16).to(torch.bfloat16)
    torch.nn.init.normal_(head.weight)
    h = torch.randn(3, 16, dtype=torch.bfloat16)
    low, wide = head(h, widen=False), head(h)
    assert low.dtype == torch.bfloat16 and wide.dtype == torch.float32
    assert torch.equal(low.float(), wide)


def _backends(name: str) -> set[str]:
    from atom.ops.registry import implementations
    return set(implementations(name))


def test_cascade_group_rows_is_the_backends_answer():
    """The decode runner's shared-prefix group size comes from the chosen backend (CPU: torch's
    rule, 64 query rows per KV head, 2 to 16), whichever decode attention op asks."""
    from atom.ops import ops
    ops.configure(torch.device("cpu"), {})
    try:
        for invariant in (False, True):  # batch-invariant mode picks among its own backends
            ops.configure(torch.device("cpu"), {}, batch_invariant=invariant)
            for op in ("paged_attention_decode", "mla_attention_decode"):
                got = [ops.cascade_group_rows(op, h) for h in (1, 4, 8, 16, 20, 64, 128)]
                assert got == [16, 16, 8, 4, 3, 2, 2]
    finally:
        ops.configure(torch.device("cpu"), {})
