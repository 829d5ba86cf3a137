"""GRPO with a colocated rollout engine: a complete, small RL loop that runs on CPU in seconds.

Each step:
  1. the engine samples n completions per prompt, with the logprob of every sampled token;
  2. the engine sleeps (level 2: KV cache and weights released, as a colocated trainer on a
     GPU would need the memory);
  3. the reward of a completion is the fraction of its tokens in the lower half of the
     vocabulary (learnable in a few steps); advantages are normalised within each prompt's
     group (GRPO); the trainer (a transformers model of the same checkpoint) recomputes the
     sampled tokens' logprobs, which must match the engine's, and takes a policy-gradient step;
  4. the new weights are pushed into the engine (atom.weights_sync.push -> update_weights),
     then the KV cache comes back, and the next rollout uses them.

    python examples/grpo_colocated.py [--steps 10] [--device cpu]

A tiny random Qwen3 checkpoint (token ids only) is written to a temporary directory; pass
--model DIR to use another HF checkpoint (then prompts are still random token ids).
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

from atom import RolloutEngine, SamplingParams
from atom.weights_sync import push


def tiny_checkpoint(path: str, seed: int = 0) -> str:
    """A tiny random Qwen3 (vocab 256, 2 layers, hidden 64) saved as an HF checkpoint."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).to(torch.float32).save_pretrained(path)
    return path


def reward(tokens: list[int], vocab_size: int) -> float:
    """Fraction of generated tokens in the lower half of the vocabulary."""
    return sum(t < vocab_size // 2 for t in tokens) / max(len(tokens), 1)


def sequence_logprobs(model, prompt: list[int], completions: list[list[int]], device) -> torch.Tensor:
    """[n, T] logprobs of each completion's tokens under `model` (all completions have length T)."""
    ids = torch.tensor([prompt + c for c in completions], device=device)
    logits = model(input_ids=ids).logits.float()
    p = len(prompt)
    logp = torch.log_softmax(logits[:, p - 1:-1], dim=-1)
    return logp.gather(-1, ids[:, p:, None]).squeeze(-1)


def main(steps: int = 10, num_prompts: int = 8, n: int = 8, prompt_len: int = 8, max_tokens: int = 16,
         lr: float = 5e-2, seed: int = 0, model: str | None = None, device: str = "cpu",
         verbose: bool = True) -> dict:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    tmp = None
    if model is None:
        tmp = tempfile.TemporaryDirectory(prefix="atom_grpo_")
        model = tiny_checkpoint(tmp.name, seed)
    engine = RolloutEngine(model, device=device, dtype="float32", max_num_seqs=num_prompts * n,
                           max_model_len=prompt_len + max_tokens + 1, seed=seed,
                           enable_sleep_mode=device != "cpu")
    trainer = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device)
    trainer.train()
    opt = torch.optim.Adam(trainer.parameters(), lr=lr)
    vocab = engine.vocab_size
    rng = random.Random(seed)
    history = {"reward": [], "logprob_diff": [], "weight_version": [], "seconds": []}
    if verbose:
        print(f"GRPO on {model}: {num_prompts} prompts x {n} samples x {max_tokens} tokens per step")
    for step in range(steps):
        t0 = time.perf_counter()
        prompts = [[rng.randrange(2, vocab) for _ in range(prompt_len)] for _ in range(num_prompts)]
        params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0,
                                seed=rng.getrandbits(32))
        outs = engine.generate(prompts, params)
        version = outs[0].outputs[0].weight_version
        engine.sleep(level=2)  # the trainer gets the memory; the weights are replaced below anyway

        rewards, diffs, loss_terms = [], [], []
        for prompt, out in zip(prompts, outs):
            comps = [c.token_ids for c in out.outputs]
            r = torch.tensor([reward(c, vocab) for c in comps], device=device)
            adv = (r - r.mean()) / (r.std() + 1e-4)
            logp = sequence_logprobs(trainer, prompt, comps, device)
            rollout_logp = torch.tensor([c.logprobs for c in out.outputs], device=device)
            diffs.append((logp.detach() - rollout_logp).abs().max().item())
            loss_terms.append(-(adv[:, None] * logp).mean())
            rewards.append(r.mean().item())
        loss = torch.stack(loss_terms).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

        engine.wake_up(["weights"])
        new_version = push(trainer, engine)  # streamed, tensor by tensor, into the engine's weights
        engine.wake_up(["kv_cache"])

        mean_r = sum(rewards) / len(rewards)
        history["reward"].append(mean_r)
        history["logprob_diff"].append(max(diffs))
        history["weight_version"].append(version)
        history["seconds"].append(time.perf_counter() - t0)
        if verbose:
            print(f"step {step:3d}  reward {mean_r:.3f}  max |rollout - trainer logprob| {max(diffs):.1e}  "
                  f"rollout weights v{version} -> v{new_version}  ({history['seconds'][-1]:.2f} s)")
    if verbose:
        curve = " ".join(f"{r:.2f}" for r in history["reward"])
        print(f"reward curve: {curve}")
    if tmp is not None:
        tmp.cleanup()
    return history


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    main(steps=a.steps, num_prompts=a.prompts, n=a.n, max_tokens=a.max_tokens, lr=a.lr, seed=a.seed,
         model=a.model, device=a.device)
