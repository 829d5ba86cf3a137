"""DeepSeek-V3's shared experts folded into the fused MoE (DeepseekMoE without parallelism): the
checkpoint's shared_experts.* tensors land in the experts after the routed ones, cut in equal
parts of the intermediate rows, and the layer computes HF's routed sum plus shared MLP."""
from __future__ import annotations

import pytest
import torch

from atom.models.deepseek_v3 import DeepseekMoE
from atom.models.hf_config import load_model_args
from atom.models.registry import model_class
from atom.models.weights import WeightMap, iter_checkpoint, load_checkpoint, load_weights
from atom.ops import ops


@pytest.fixture(scope="module")
def two_shared(make_tiny_model):
    return make_tiny_model("deepseek_v3", n_shared_experts=2, first_k_dense_replace=1, num_hidden_layers=2)


def _build(path):
    args = load_model_args(path)
    return args, model_class(args.architecture)(args)


@pytest.mark.parametrize("loader", ["update", "safetensors"])
def test_shared_experts_land_after_the_routed_ones(two_shared, loader):
    ops.configure(torch.device("cpu"))
    args, model = _build(two_shared)
    wm = WeightMap(model)
    if loader == "update":
        load_weights(model, wm, iter_checkpoint(two_shared))
    else:
        load_checkpoint(model, wm, two_shared)
    hf = dict(iter_checkpoint(two_shared))
    moe = model.model.layers[1].mlp
    assert isinstance(moe, DeepseekMoE) and moe.shared_experts is None and moe.shared_experts_folded == 2
    e, inter = args.num_experts, args.moe_intermediate_size
    assert moe.w13.shape[0] == moe.w2.shape[0] == e + 2
    pre = "model.layers.1.mlp.shared_experts."
    gate, up, down = hf[pre + "gate_proj.weight"], hf[pre + "up_proj.weight"], hf[pre + "down_proj.weight"]
    for j in range(2):
        rows = slice(j * inter, (j + 1) * inter)
        assert torch.equal(moe.w13[e + j, :inter], gate[rows])
        assert torch.equal(moe.w13[e + j, inter:], up[rows])
        assert torch.equal(moe.w2[e + j], down[:, rows])
    # the routed experts are untouched by the shared ones
    assert torch.equal(moe.w13[3, :inter], hf["model.layers.1.mlp.experts.3.gate_proj.weight"])


def test_folded_layer_matches_hf_moe(two_shared):
    """The folded layer's output against HF's DeepseekV3MoE (routed experts + shared MLP)."""
    from transformers import AutoModelForCausalLM
    ops.configure(torch.device("cpu"))
    hf_model = AutoModelForCausalLM.from_pretrained(two_shared, torch_dtype=torch.float32).eval()
    args, model = _build(two_shared)
    load_weights(model, WeightMap(model), iter_checkpoint(two_shared))
    x = torch.randn(13, args.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf_model.model.layers[1].mlp(x[None])[0]
        got = model.model.layers[1].mlp(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and a changed shared weight changes the output (the folded copy is what runs)
    with torch.no_grad():
        model.model.layers[1].mlp.w2[args.num_experts + 1].mul_(2.0)
        assert (model.model.layers[1].mlp(x) - want).abs().max() > 1e-3


def test_update_with_a_wrong_shared_shape_is_refused(two_shared):
    ops.configure(torch.device("cpu"))
    args, model = _build(two_shared)
    wm = WeightMap(model)
    load_weights(model, wm, iter_checkpoint(two_shared))
    before = model.model.layers[1].mlp.w13.detach().clone()
    bad = torch.randn(args.moe_intermediate_size, args.hidden_size)  # one part's rows, not two
    with pytest.raises(ValueError, match="shared_experts.gate_proj.weight.*shape"):
        load_weights(model, wm, [("model.layers.1.mlp.shared_experts.gate_proj.weight", bad)], require_all=False)
    assert torch.equal(model.model.layers[1].mlp.w13, before)
