"""Weight updates and sleep / wake as the frameworks and peer engines exercise them, on tiny random
models with HF transformers as the oracle: after a trainer's perturbed weights are pushed, the
engine's logprobs must be HF's logprobs under those weights.

The scenarios follow what vLLM (sleep levels, `wake_up(tags)`, `collective_rpc("reload_weights")`,
`load_weights`), TRL (per-tensor `load_weights` after `wake_up(["weights"])`), OpenRLHF
(`init_process_group` / `update_weight` over a torch process group), SGLang
(`release_memory_occupation` / `resume_memory_occupation`, `update_weights_from_tensor`) and verl
(`load_weights` from a generator) rely on. Written for atom; no code is taken from those projects.
"""
from __future__ import annotations

import datetime
import gc
import os

import pytest
import torch
import torch.multiprocessing as mp

from _rl_util import make_engine
from atom import SamplingParams
from atom.compat.vllm import LLM
from atom.models.weights import iter_checkpoint
from test_weights_sync import _free_port, _leave

PROMPT = [5, 17, 99, 42, 3, 250, 7, 64, 128, 31, 8, 200]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
TOL = 2e-4  # float32 engine vs float32 HF: summation order only


# ---- the oracle ------------------------------------------------------------------------------------

def perturbed(path: str, seed: int = 1, scale: float = 0.05, dtype=torch.float32, names=None):
    """The HF model at `path` (a trainer after an optimizer step): the parameters in `names`
    (default: all) moved by seeded noise, and rounded to `dtype` (the model itself stays
    float32, RoPE buffers included, so that it is the oracle of those rounded weights)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if names is None or n in names:
                p.add_(scale * torch.randn(p.shape, generator=gen))
            p.copy_(p.to(dtype))
    return model.eval()


def trainer_pairs(model, dtype=torch.float32) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the trainer's parameters as it would send them (e.g. bf16)."""
    return [(n, p.detach().to(dtype)) for n, p in model.named_parameters()]


@torch.no_grad()
def hf_logprobs(model, prompt=PROMPT) -> torch.Tensor:
    """log p(prompt[i] | prompt[:i]) for i >= 1, by HF in float32."""
    logits = model(torch.tensor([prompt])).logits[0].float()
    return logits[:-1].log_softmax(-1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]


def engine_logprobs(engine, prompt=PROMPT) -> torch.Tensor:
    """The same numbers from the engine (raw prompt logprobs)."""
    out = engine.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1, logprobs_mode="raw"))
    lps = out[0].prompt_logprobs
    return torch.tensor([lps[i][tok] for i, tok in enumerate(prompt) if i > 0])


def assert_matches(engine, model) -> None:
    diff = (engine_logprobs(engine) - hf_logprobs(model)).abs().max().item()
    assert diff < TOL, f"engine logprobs differ from HF's by {diff}"


def held(engine) -> dict[str, torch.Tensor]:
    """Every HF-named tensor as the engine holds it (flattened copies)."""
    return {n: engine.get_weights_by_name(n, truncate_size=t.numel()) for n, t in iter_checkpoint(engine.config.model)}


def assert_held_unchanged(engine, before: dict[str, torch.Tensor], except_names=()) -> None:
    for n, t in held(engine).items():
        if n not in except_names:
            assert torch.equal(t, before[n]), f"{n} changed"


@pytest.fixture(scope="module")
def qwen3(make_tiny_model):
    return make_tiny_model("qwen3")


# ---- partial updates, stacked slices, atomicity ----------------------------------------------------

STACKED = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
           "model.layers.1.self_attn.v_proj.weight", "model.layers.0.mlp.gate_proj.weight",
           "model.layers.0.mlp.up_proj.weight"]


def test_partial_update_of_stacked_slices_leaves_the_rest_and_matches_hf(qwen3):
    """q/k/v land in the fused qkv parameter and gate/up in gate_up, each in its rows; every
    tensor not named keeps its bits; the engine then computes what HF computes."""
    engine = make_engine(qwen3)
    before = held(engine)
    trainer = perturbed(qwen3, names=set(STACKED[:3]))  # only q/k/v of layer 1 move
    params = dict(trainer.named_parameters())
    assert engine.update_weights([(n, params[n].detach()) for n in STACKED[:3]], partial=True) == 1
    assert_held_unchanged(engine, before, except_names=STACKED[:3])
    for n in STACKED[:3]:
        assert torch.equal(engine.get_weights_by_name(n, truncate_size=params[n].numel()), params[n].flatten())
    assert engine.weights_complete
    assert_matches(engine, trainer)
    # gate / up of another layer through vLLM's load_weights (the version stays).
    trainer2 = perturbed(qwen3, seed=2, names=set(STACKED))
    p2 = dict(trainer2.named_parameters())
    llm_model = _vllm_model(engine)
    assert llm_model.load_weights([(n, p2[n].detach()) for n in STACKED]) == set(STACKED)
    assert engine.weight_version == 1
    assert_matches(engine, trainer2)


def _vllm_model(engine):
    """What TRL / verl reach for: the model behind vLLM's driver worker, over this engine."""
    from atom.compat.vllm.worker import make_worker
    return make_worker(engine).model_runner.model


@pytest.mark.parametrize("bad,match", [
    (("model.layers.0.mlp.nonsense.weight", torch.zeros(4)), "model.layers.0.mlp.nonsense.weight"),
    (("model.norm.weight", torch.zeros(63)), r"'model\.norm\.weight': shape \(63,\)"),
    (("model.norm.weight", torch.ones(64, dtype=torch.int32)), r"'model\.norm\.weight': expected a floating"),
])
def test_a_bad_tensor_anywhere_in_a_list_changes_nothing(qwen3, bad, match):
    """update_weights and vLLM's load_weights given a list (or a state_dict): a bad tensor after
    good ones is named, and no weight changed (not even the good ones before it)."""
    engine = make_engine(qwen3)
    before = held(engine)
    expected = engine_logprobs(engine)
    trainer = perturbed(qwen3)
    good = [(n, p.detach()) for n, p in trainer.named_parameters()][:6]
    for call in (lambda pairs: engine.update_weights(pairs, partial=True),
                 lambda pairs: engine.update_weights(dict(pairs), partial=True),
                 lambda pairs: _vllm_model(engine).load_weights(pairs),
                 lambda pairs: _vllm_model(engine).load_weights(dict(pairs))):
        with pytest.raises(ValueError, match=match):
            call(good + [bad])
        assert engine.weights_complete and engine.weight_version == 0
        assert_held_unchanged(engine, before)
    assert torch.equal(engine_logprobs(engine), expected)


def test_streamed_updates_refuse_at_the_first_bad_tensor(qwen3):
    """A generator (verl's shape) is checked as it streams: a bad first tensor changes nothing; a
    bad tensor after good ones leaves the engine refusing to generate until a complete update."""
    engine = make_engine(qwen3)
    before = held(engine)
    trainer = perturbed(qwen3)
    pairs = [(n, p.detach()) for n, p in trainer.named_parameters()]
    with pytest.raises(ValueError, match="model.bogus"):
        _vllm_model(engine).load_weights(iter([("model.bogus", torch.zeros(2))] + pairs))
    assert engine.weights_complete
    assert_held_unchanged(engine, before)
    with pytest.raises(ValueError, match="model.bogus"):
        engine.update_weights(iter(pairs[:3] + [("model.bogus", torch.zeros(2))]))
    assert not engine.weights_complete
    with pytest.raises(RuntimeError, match="incomplete"):
        engine.generate([PROMPT], GREEDY)
    engine.update_weights(iter(pairs))
    assert engine.weights_complete
    assert_matches(engine, trainer)


def test_bf16_trainer_tensors_into_a_float32_engine(qwen3):
    """A bf16 trainer (or push(dtype=bfloat16)): every tensor is cast exactly; the engine equals
    HF run in float32 on the bf16-rounded weights."""
    engine = make_engine(qwen3)
    trainer = perturbed(qwen3, dtype=torch.bfloat16)
    pairs = trainer_pairs(trainer, torch.bfloat16)
    engine.update_weights(pairs)
    for n, t in pairs:
        assert torch.equal(engine.get_weights_by_name(n, truncate_size=t.numel()), t.float().flatten()), n
    assert_matches(engine, trainer)


def test_state_dict_with_tied_embeddings(make_tiny_model):
    """A tied model's state_dict() carries lm_head.weight as the embedding itself; named_parameters()
    leaves it out. Both are complete updates; the head follows the embedding."""
    path = make_tiny_model("llama", tie_word_embeddings=True)
    engine = make_engine(path)
    trainer = perturbed(path)
    sd = trainer.state_dict()
    assert "lm_head.weight" in sd and sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    assert engine.update_weights(sd) == 1
    assert_matches(engine, trainer)
    trainer2 = perturbed(path, seed=3)
    assert "lm_head.weight" not in dict(trainer2.named_parameters())
    engine.sleep(level=2)  # discarded: a complete update must come, and named_parameters() is one
    engine.wake_up(["weights"])
    engine.update_weights((n, p.detach()) for n, p in trainer2.named_parameters())
    engine.wake_up(["kv_cache"])
    assert engine.weights_complete
    assert_matches(engine, trainer2)


# ---- sleep / wake --------------------------------------------------------------------------------

@pytest.mark.parametrize("level", [1, 2])
def test_update_while_weights_sleep_is_refused_then_wake_and_update(qwen3, level):
    """Weights released: generate and update_weights raise RuntimeError and change nothing. Then the
    RL order: wake_up(["weights"]), push, wake_up(["kv_cache"]); the engine serves the new weights."""
    engine = make_engine(qwen3)
    before = engine.generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    trainer = perturbed(qwen3)
    pairs = [(n, p.detach()) for n, p in trainer.named_parameters()]
    engine.sleep(level=level)
    assert engine.is_sleeping and engine.sleeping_tags == {"weights", "kv_cache"}
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.generate([PROMPT], GREEDY)
    with pytest.raises(RuntimeError, match=r"wake_up\(\['weights'\]\)"):
        engine.update_weights(pairs)
    with pytest.raises(RuntimeError, match="wake_up"):
        _vllm_model(engine).load_weights(pairs[:1])
    assert engine.weight_version == 0 and engine.sleeping_tags == {"weights", "kv_cache"}
    assert engine.weights_complete == (level == 1)
    if level == 1:  # the offloaded weights come back unchanged
        engine.wake_up()
        assert engine.generate([PROMPT], GREEDY)[0].outputs[0].token_ids == before
        engine.sleep(level=1)
    engine.wake_up(["weights"])
    with pytest.raises(RuntimeError, match="sleeping"):  # the KV cache is still released
        engine.generate([PROMPT], GREEDY)
    assert engine.update_weights(pairs) == 1
    engine.wake_up(["kv_cache"])
    assert not engine.is_sleeping and engine.weights_complete
    assert_matches(engine, trainer)


def test_sglang_release_resume_then_update_from_tensor(qwen3):
    """SGLang's order: release everything, resume everything (weights undefined), then
    update_weights_from_tensor(list(model.named_parameters())); and the multi-stage variant."""
    engine = make_engine(qwen3)
    trainer = perturbed(qwen3, dtype=torch.bfloat16)
    engine.release_memory_occupation()
    engine.resume_memory_occupation()
    with pytest.raises(RuntimeError, match="incomplete"):
        engine.generate([PROMPT], GREEDY)
    engine.update_weights_from_tensor(trainer_pairs(trainer, torch.bfloat16))
    assert engine.weights_complete
    assert_matches(engine, trainer)
    trainer2 = perturbed(qwen3, seed=5)
    engine.release_memory_occupation(["kv_cache"])
    engine.release_memory_occupation(["weights"])
    engine.resume_memory_occupation(["weights"])
    engine.update_weights_from_tensor(list(trainer2.named_parameters()))
    engine.resume_memory_occupation(["kv_cache"])
    assert_matches(engine, trainer2)


def test_vllm_sleep_level_2_reload_weights(qwen3):
    """vLLM's level-2 recipe: sleep(2), wake_up(["weights"]), collective_rpc("reload_weights"),
    wake_up(["kv_cache"]): the checkpoint's tokens again. And reload from a trainer's tensors."""
    llm = LLM(qwen3, device="cpu", num_kv_blocks=32, max_model_len=128)
    from atom.compat.vllm import SamplingParams as VllmParams
    sp = VllmParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": PROMPT}], sp, use_tqdm=False)[0].outputs[0].token_ids
    llm.sleep(level=2)
    llm.wake_up(tags=["weights"])
    assert llm.collective_rpc("reload_weights") == [None]
    llm.wake_up(tags=["kv_cache"])
    assert llm.generate([{"prompt_token_ids": PROMPT}], sp, use_tqdm=False)[0].outputs[0].token_ids == first
    trainer = perturbed(qwen3)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(trainer.named_parameters())})
    assert_matches(llm.engine, trainer)
    assert llm.engine.weight_version == 0
    with pytest.raises(ValueError, match="not both"):
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": [], "weights_path": qwen3})


def test_repeated_update_cycles_keep_memory_flat(make_tiny_model):
    """A training loop's cycles (sleep, wake weights, push, wake KV, generate): the pools' sizes,
    the live tensors and the process's memory stay flat."""
    path = make_tiny_model("llama", hidden_size=256, intermediate_size=1024, vocab_size=1024, head_dim=64)
    engine = make_engine(path)
    trainers = [perturbed(path, seed=s, scale=0.01) for s in (1, 2)]
    pairs = [[(n, p.detach()) for n, p in t.named_parameters()] for t in trainers]
    model_bytes = sum(t.numel() * t.element_size() for t in trainers[0].parameters())
    pools = (engine.memory_bytes("weights"), engine.memory_bytes("kv_cache"))

    def cycle(i: int) -> None:
        engine.sleep(level=2 if i % 2 else 1)
        engine.wake_up(["weights"])
        engine.update_weights(iter(pairs[i % 2]))
        engine.wake_up(["kv_cache"])
        engine.generate([PROMPT], GREEDY)
        assert (engine.memory_bytes("weights"), engine.memory_bytes("kv_cache")) == pools

    def live() -> tuple[int, int]:
        gc.collect()
        tensors = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return tensors, rss

    for i in range(2):  # warm-up: host offload buffer, allocator caches
        cycle(i)
    tensors, rss = live()
    for i in range(6):
        cycle(i)
    tensors2, rss2 = live()
    assert tensors2 == tensors
    assert rss2 - rss < model_bytes, f"host memory grew by {(rss2 - rss) / 2**20:.1f} MiB over 6 cycles"
    assert_matches(engine, trainers[1])


# ---- a trainer process broadcasting over a torch process group (gloo) -----------------------------

GROUP = "openrlhf"
TIMEOUT = datetime.timedelta(seconds=60)


def _framework_group(port: int, rank: int, world_size: int):
    """A trainer's side as OpenRLHF, SGLang and open-instruct build it: torch's own rendezvous and
    process-group construction for a group named GROUP (not atom's code), used with
    torch.distributed.broadcast(..., group=pg)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world, rendezvous
    store, rank, world_size = next(rendezvous(f"tcp://127.0.0.1:{port}", rank, world_size, timeout=TIMEOUT))
    store.set_timeout(TIMEOUT)
    pg, _ = _new_process_group_helper(world_size, rank, [], dist.Backend("gloo"), dist.PrefixStore(GROUP, store),
                                      group_name=GROUP, timeout=TIMEOUT)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _c10d_trainer(base: str, port: int) -> None:
    import torch.distributed as dist
    pg = _framework_group(port, 0, 2)
    trainer = perturbed(base, dtype=torch.bfloat16)
    for _, t in trainer_pairs(trainer, torch.bfloat16):  # 1. OpenRLHF: one update_weight call per tensor
        dist.broadcast(t, src=0, group=pg)
    dist.broadcast(torch.zeros(3), src=0, group=pg)  # 2. an unknown name
    dist.broadcast(torch.zeros(7), src=0, group=pg)  # 3. a wrong shape
    trainer2 = perturbed(base, seed=4)
    for _, p in trainer2.named_parameters():  # 4. TRL's batch call: all announced first
        dist.broadcast(p.detach(), src=0, group=pg)
    dist.destroy_process_group(pg)


def _c10d_engine(base: str, port: int) -> None:
    llm = LLM(base, device="cpu", num_kv_blocks=32, max_model_len=128)
    engine = llm.engine
    llm.collective_rpc("init_process_group", args=("127.0.0.1", port, 1, 2, GROUP, "gloo"))
    trainer = perturbed(base, dtype=torch.bfloat16)
    for n, t in trainer_pairs(trainer, torch.bfloat16):
        llm.collective_rpc("update_weight", args=(n, t.dtype, tuple(t.shape)))
    assert_matches(engine, trainer)
    assert engine.weight_version == 0 and engine.weights_complete
    snapshot = held(engine)
    with pytest.raises(ValueError, match="'model.nonsense.weight' is not a parameter"):
        llm.collective_rpc("update_weight", args=("model.nonsense.weight", "torch.float32", [3]))
    with pytest.raises(ValueError, match=r"'model.norm.weight': shape \(7,\)"):
        llm.collective_rpc("update_weight", args=("model.norm.weight", torch.float32, [7]))
    assert_held_unchanged(engine, snapshot)  # refused after the broadcast: the group is still in step
    trainer2 = perturbed(base, seed=4)
    llm.collective_rpc("batch_update_named_params",
                       args=([(n, str(p.dtype), list(p.shape)) for n, p in trainer2.named_parameters()],))
    assert_matches(engine, trainer2)
    llm.collective_rpc("close_communicator")


def _c10d_worker(i: int, base: str, port: int) -> None:
    torch.set_num_threads(1)
    (_c10d_trainer if i == 0 else _c10d_engine)(base, port)
    _leave()


def test_trainer_process_broadcasts_over_its_own_torch_group(qwen3):
    """OpenRLHF / SGLang: the trainer (rank 0) builds its group with torch's own machinery; the
    engine joins through the vLLM worker's init_process_group and takes update_weight calls."""
    mp.spawn(_c10d_worker, args=(qwen3, _free_port()), nprocs=2, join=True)


def test_fused_names_as_vllm_loads_them(qwen3):
    """vLLM's load_weights also takes its own fused tensors (qkv_proj = q|k|v rows, gate_up_proj =
    gate|up), which are the engine's parameter names: a round trip of named_parameters() works; a
    fused tensor and one of its parts in the same update are refused."""
    engine = make_engine(qwen3)
    trainer = perturbed(qwen3)
    donor = make_engine(qwen3)
    donor.update_weights(trainer_pairs(trainer))
    fused = [(n, p.detach()) for n, p in donor.named_parameters()]
    assert any(n.endswith("qkv_proj.weight") for n, _ in fused) and any(n.endswith("gate_up_proj.weight") for n, _ in fused)
    assert engine.update_weights(fused) == 1  # complete: the fused names cover q, k, v, gate, up
    assert_matches(engine, trainer)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    q = dict(trainer.named_parameters())["model.layers.0.self_attn.q_proj.weight"].detach()
    with pytest.raises(ValueError, match=f"'model.layers.0.self_attn.q_proj.weight', which '{qkv}'"):
        _vllm_model(engine).load_weights([(qkv, dict(fused)[qkv]), ("model.layers.0.self_attn.q_proj.weight", q)])
    with pytest.raises(ValueError, match=r"qkv_proj.weight': shape \(3, 64\)"):
        engine.update_weights([(qkv, torch.zeros(3, 64))], partial=True)
    assert engine.weights_complete
    assert_matches(engine, trainer)
