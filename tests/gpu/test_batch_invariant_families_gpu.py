"""EngineConfig(batch_invariant=True) on CUDA with the families whose own ops have no Triton
batch-invariant version yet (GPT-OSS, Mixtral with a sliding window, DeepSeek-V3): nothing runs
a batch-dependent kernel silently; the op raises a ValueError that names it.

The registry check also runs in Triton's interpreter on the CPU (it only asks the registry what
it would bind on CUDA): `ATOM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 PYTHONPATH=$PWD:/work/triton_pkgs
python -m pytest -m gpu tests/gpu/test_batch_invariant_families_gpu.py`; the engine check needs a GPU.
"""
from __future__ import annotations

import pytest
import torch

from atom import RolloutEngine, SamplingParams
from atom.ops.invariant_family_ops import FAMILY_INVARIANT_OPS

from gpu_helpers import ON_CPU, triton_ops  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu
FAMILY_OPS = FAMILY_INVARIANT_OPS + ("mla_cache_write",)
MISSING = r"op '(sliding_sink_attention_\w+|clamped_swiglu|fused_moe_biased|moe_route_grouped|mla_\w+)' has no " \
          r"batch-invariant implementation on cuda"


def test_family_ops_on_cuda_are_invariant_or_raise(triton_ops):
    from atom.ops import OpTable
    from atom.ops.registry import capabilities
    table = OpTable()
    table.configure(torch.device("cuda"), batch_invariant=True)  # the choice only: no kernel runs
    for name in FAMILY_OPS:
        backend = table.backend_of[name]
        if backend == "missing":
            with pytest.raises(ValueError, match=f"op '{name}' has no batch-invariant implementation on cuda"):
                getattr(table, name)()
        else:
            assert "batch_invariant" in capabilities(name, backend), (name, backend)


@pytest.mark.skipif(ON_CPU, reason="a CUDA engine")
@pytest.mark.parametrize("arch,overrides", [("gpt_oss", {}), ("mixtral", dict(sliding_window=5)),
                                            ("deepseek_v3", {})])
def test_a_family_without_triton_invariant_ops_raises_naming_the_op(make_tiny_model, arch, overrides):
    from atom.ops import ops
    path = make_tiny_model(arch, **overrides)
    try:
        with pytest.raises(ValueError, match=MISSING):
            eng = RolloutEngine(path, device="cuda", batch_invariant=True, num_kv_blocks=64, max_num_seqs=4)
            eng.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=2))
    finally:
        ops.configure(torch.device("cpu"))  # the process-wide table back to its default
