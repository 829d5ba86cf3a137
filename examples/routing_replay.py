"""Rollout routing replay on a tiny Qwen3-MoE (CPU, no hub): `python examples/routing_replay.py`.

1. The engine samples completions and returns, per completion, the experts every MoE layer chose
   for every token (`return_routed_experts=True`).
2. The trainer's copy of the model drifts a little (here: its routers are nudged, as an optimizer
   step or bf16 rounding would), so some tokens would go to other experts in the trainer.
3. Under `atom.fidelity.routing_replay` the trainer routes like the rollout did: its logprobs stay
   close to the rollout's, and gradients still reach the routers.
"""
from __future__ import annotations

import tempfile

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from atom import RolloutEngine, SamplingParams
from atom.fidelity import moe_routers, pad_routed, routing_replay


def tiny_moe(path: str) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=256,
                            bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.eval()


def trainer_logprobs(model, ids: list[int], first: int) -> torch.Tensor:
    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return torch.stack([lp[p - 1, ids[p]] for p in range(first, len(ids))])


def main() -> dict:
    path = tempfile.mkdtemp(prefix="atom_tiny_moe_")
    trainer = tiny_moe(path)
    engine = RolloutEngine(path, device="cpu", enable_return_routed_experts=True)
    prompt = [5, 17, 42, 99, 7, 120, 33, 8]
    out = engine.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=24, logprobs=0,
                                                   logprobs_mode="raw", ignore_eos=True,
                                                   return_routed_experts=True))[0]
    with torch.no_grad():  # the trainer's routers drift a little
        for r in moe_routers(trainer):
            r.weight.add_(0.003 * torch.randn(r.weight.shape, generator=torch.Generator().manual_seed(3)))
    gaps = {"own routing": 0.0, "replayed": 0.0}
    for c in out.outputs:
        ids = prompt + c.token_ids
        rollout = torch.tensor(c.logprobs)
        routed = pad_routed([c.routed_experts], len(ids), *c.routed_experts.shape[1:])
        with torch.no_grad():
            gaps["own routing"] = max(gaps["own routing"],
                                      (trainer_logprobs(trainer, ids, len(prompt)) - rollout).abs().max().item())
            with routing_replay(trainer, routed):
                replayed = trainer_logprobs(trainer, ids, len(prompt))
            gaps["replayed"] = max(gaps["replayed"], (replayed - rollout).abs().max().item())
    print(f"routed_experts per completion: {out.outputs[0].routed_experts.shape} (positions, MoE layers, top-k)")
    print(f"max |trainer - rollout| logprob: own routing {gaps['own routing']:.4f}, replayed {gaps['replayed']:.4f}")
    return gaps


if __name__ == "__main__":
    main()
