"""Issue 13: what update_weights, checkpoints and config.json may not slip through.

Every refused update leaves the engine as it was: same weights (bitwise), same version, still
complete and serving. Checkpoint files named by an index stay inside the checkpoint directory;
a config.json that cannot describe its checkpoint fails before a model is built.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _rl_util import PROMPTS, make_engine, rollout, rollout_from_scratch, same
from atom import RolloutEngine
from atom.models.weights import iter_checkpoint

NAME = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_path):
    engine = make_engine(tiny_qwen3_path)
    return engine, rollout(engine), dict(iter_checkpoint(tiny_qwen3_path))


def _assert_unchanged(engine, before, version) -> None:
    """Same version, still complete, and (the weights) bitwise the same greedy and sampled rollouts."""
    assert engine.weight_version == version and engine.weights_complete
    assert same(rollout_from_scratch(engine), before)


def _bad_updates(ckpt: dict[str, torch.Tensor]):
    t = torch.randn_like(ckpt[NAME])
    return [
        ([(NAME, t), ("model.norm.weight", torch.randn_like(ckpt["model.norm.weight"])), (NAME, t * 2)], ValueError,
         f"weight '{NAME}' appears twice in one update"),
        ([(NAME, t), (NAME,)], TypeError, "weight update item 1: expected a \\(name, tensor\\) pair, got a tuple of "
                                          "length 1"),
        ([(NAME, t, 3)], TypeError, "item 0: expected a \\(name, tensor\\) pair, got a tuple of length 3"),
        ([(NAME, t), 5], TypeError, "item 1: expected a \\(name, tensor\\) pair, got int"),
        ([(NAME, t), (7, t)], TypeError, "item 1: the name must be a str, got int 7"),
        ([(NAME, t.tolist())], TypeError, f"weight '{NAME}': expected a torch.Tensor, got list"),
        ([(NAME, t.numpy())], TypeError, f"weight '{NAME}': expected a torch.Tensor, got ndarray"),
        ([(NAME, t), ("model.norm.weight", torch.empty(64, device="meta"))], ValueError,
         "weight 'model.norm.weight' is a meta tensor"),
        ([(NAME, t), ("model.norm.weight", torch.full((64,), float("nan")))], ValueError, "non-finite"),
    ]


def test_refused_updates_change_nothing(qwen3):
    engine, before, ckpt = qwen3
    version = engine.weight_version
    for pairs, exc, match in _bad_updates(ckpt):
        with pytest.raises(exc, match=match):
            engine.update_weights(pairs, partial=True, check_finite=True)
        _assert_unchanged(engine, before, version)
    # A dict (a state_dict) is checked whole as well.
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights({NAME: torch.randn_like(ckpt[NAME]), "model.norm.weight": torch.zeros(3)}, partial=True)
    _assert_unchanged(engine, before, version)


def test_a_streamed_duplicate_is_refused_and_the_engine_refuses_to_generate(tiny_qwen3_path):
    """A generator is checked as it streams: the second copy is refused (not silently applied), and
    since the first was already written the engine refuses to generate until a complete update."""
    engine = make_engine(tiny_qwen3_path)
    t = torch.randn_like(dict(iter_checkpoint(tiny_qwen3_path))[NAME])
    with pytest.raises(ValueError, match="appears twice"):
        engine.update_weights(iter([(NAME, t), (NAME, t * 2)]), partial=True)
    assert not engine.weights_complete
    with pytest.raises(RuntimeError, match="incomplete"):
        engine.generate(PROMPTS)


def test_per_expert_and_fused_tensors_for_the_same_experts_are_refused(tiny_qwen3_moe_path):
    engine = make_engine(tiny_qwen3_moe_path)
    ckpt = dict(iter_checkpoint(tiny_qwen3_moe_path))
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    single = "model.layers.0.mlp.experts.3.up_proj.weight"
    experts = sum(1 for n in ckpt if n.startswith("model.layers.0.mlp.experts.") and n.endswith(".up_proj.weight"))
    inter, hidden = ckpt[single].shape
    before = rollout(engine)
    pairs = [(fused, torch.randn(experts, 2 * inter, hidden)), (single, torch.randn(inter, hidden))]
    with pytest.raises(ValueError, match=f"weight '{single}' fills '{single}', which '{fused}' of this update "
                                         "already filled"):
        engine.update_weights(pairs, partial=True)
    _assert_unchanged(engine, before, 0)


# ---- checkpoints ---------------------------------------------------------------------------------


def _indexed_checkpoint(src: str, dst: Path, file_name: str) -> Path:
    """A copy of src whose index names `file_name` (relative to dst) for every tensor."""
    shutil.copytree(src, dst)
    from safetensors import safe_open
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: file_name for n in names}}))
    return dst


def test_checkpoint_index_cannot_name_files_outside_the_checkpoint(tiny_qwen3_path, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(Path(tiny_qwen3_path) / "model.safetensors", elsewhere / "x.safetensors")
    for i, name in enumerate(["../elsewhere/x.safetensors", str(elsewhere / "x.safetensors"),
                              "sub/../../elsewhere/x.safetensors"]):
        ckpt = _indexed_checkpoint(tiny_qwen3_path, tmp_path / f"m{i}", name)
        with pytest.raises(ValueError, match="outside the checkpoint directory|is not a relative path"):
            RolloutEngine(str(ckpt), device="cpu")


def test_checkpoint_files_linked_from_inside_are_fine(tiny_qwen3_path, tmp_path):
    """As in the HF cache: the snapshot directory holds links into a blob store elsewhere."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shutil.copy(Path(tiny_qwen3_path) / "model.safetensors", blobs / "abc123")
    ckpt = tmp_path / "snapshot"
    ckpt.mkdir()
    shutil.copy(Path(tiny_qwen3_path) / "config.json", ckpt / "config.json")
    os.symlink(blobs / "abc123", ckpt / "model-00001-of-00001.safetensors")
    _indexed = json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}})
    (ckpt / "model.safetensors.index.json").write_text(_indexed)
    engine = make_engine(str(ckpt))
    assert same(rollout(engine), rollout(make_engine(tiny_qwen3_path)))


# ---- config.json -----------------------------------------------------------------------------------


def _with_config(src: str, dst: Path, edit) -> str:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("hidden_size"), r"'hidden_size' is missing"),
    (lambda c: c.update(hidden_size=10**7), r"describes a model of at least 7,700,000,000 parameters .* but the "
                                            r"checkpoint holds 106,880"),
    (lambda c: c.update(num_hidden_layers=10**6), r"at least .* parameters .*num_hidden_layers=1000000"),
    (lambda c: c.update(intermediate_size=10**9), r"at least .* parameters .*intermediate_size=1000000000"),
    (lambda c: c.update(vocab_size="256"), r"vocab_size='256' must be an integer >= 1"),
    (lambda c: c.update(num_attention_heads=0), r"num_attention_heads=0 must be an integer >= 1"),
    (lambda c: c.update(num_key_value_heads=3), r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (lambda c: c.update(rms_norm_eps=float("nan")), r"rms_norm_eps=nan must be a positive finite number"),
    (lambda c: c.update(eos_token_id="</s>"), r"eos_token_id='</s>' must be an integer or a list"),
])
def test_bad_config_is_refused_before_the_model_is_built(tiny_qwen3_path, tmp_path, edit, match):
    path = _with_config(tiny_qwen3_path, tmp_path / "m", edit)
    with pytest.raises(ValueError, match=match):
        RolloutEngine(path, device="cpu")


def test_moe_config_fields_are_checked(tiny_qwen3_moe_path, tmp_path):
    path = _with_config(tiny_qwen3_moe_path, tmp_path / "m", lambda c: c.update(num_experts_per_tok=9))
    with pytest.raises(ValueError, match=r"num_experts_per_tok=9 must be in \[1, num_experts=8\]"):
        RolloutEngine(path, device="cpu")


def test_config_alone_still_builds_a_dummy_model(tiny_qwen3_path, tmp_path):
    """load_format="dummy" has no checkpoint to compare sizes against: the config alone is enough."""
    (tmp_path / "m").mkdir()
    shutil.copy(Path(tiny_qwen3_path) / "config.json", tmp_path / "m" / "config.json")
    engine = RolloutEngine(str(tmp_path / "m"), device="cpu", load_format="dummy", num_kv_blocks=8)
    assert len(engine.generate([[3, 4]])[0].outputs[0].token_ids) >= 1


def test_numpy_is_not_a_tensor_even_when_its_shape_fits(qwen3):
    engine, _, ckpt = qwen3
    arr = np.zeros(tuple(ckpt[NAME].shape), dtype=np.float32)
    with pytest.raises(TypeError, match="expected a torch.Tensor, got ndarray"):
        engine.update_weights(iter([(NAME, arr)]), partial=True)
    assert engine.weights_complete  # refused before any copy, even streamed
