"""The physical limit of a rollout workload (bench/rollout.py): the seconds an ideal engine needs
on a device with a given copy bandwidth and matmul rate.

* Decode: every step reads the weights it touches (dense weights always; of each MoE layer's
  experts, the expected number of distinct experts its batch routes to) and the KV of every
  sequence. The n samples of a prompt share the prompt's KV: it is read once per group.
  What a token's KV costs depends on the family:
    - multi-head attention / GQA: K and V, 2 * kv_heads * head_dim values per layer;
    - MLA (DeepSeek-V3 / Moonlight): one compressed row per layer for all heads,
      kv_lora_rank + qk_rope_head_dim values (the absorbed decode reads the latents directly);
    - sliding-window layers (GPT-OSS, Mixtral) read at most `sliding_window` tokens: the end
      of the prompt while the window still reaches it, then only the sequence's own tokens.
  GPT-OSS's attention sinks are one logit per head (a few bytes of dense weights, no KV).
* Prefill: 2 FLOPs per active weight per prompt token (the LM head on the last token only;
  experts: top-k of E) plus attention: per (query, key) pair 4 * heads * head_dim FLOPs
  (QK^T and PV), MLA 2 * heads * (qk_nope + qk_rope + v_head_dim) (latents expanded to per-head
  K/V, the cheaper form for prefill); a sliding layer's query sees at most `window` keys.
The limit is the sum over the steps of an ideal schedule: all sequences at once when they fit
in max_num_seqs, else waves of whole prompt groups.
"""
from __future__ import annotations

from dataclasses import dataclass

EXPERT_PARAMS = ("w13", "w2", "b13", "b2")  # stacked per-expert tensors [E, ...] of a MoE layer


@dataclass(frozen=True)
class KVLayer:
    """One attention layer's KV: bytes per token, and the window (None: full attention)."""

    bytes_per_token: int
    window: int | None = None


def kv_layers(args, dtype_bytes: int) -> list[KVLayer]:
    """Each layer's KV cost from a ModelArgs (atom/models/hf_config.py)."""
    if args.kv_lora_rank:  # MLA: the latent c_kv and the shared roped key, one row for all heads
        per_token = (args.kv_lora_rank + args.qk_rope_head_dim) * dtype_bytes
    else:
        per_token = 2 * args.num_key_value_heads * args.head_dim * dtype_bytes
    return [KVLayer(per_token, args.sliding_window if args.is_sliding_layer(i) else None)
            for i in range(args.num_hidden_layers)]


def step_kv_bytes(layers: list[KVLayer], groups: int, batch: int, prompt_len: int, own: int) -> int:
    """KV bytes one decode step reads: `groups` prompts of prompt_len tokens (each read once for
    its group) and `batch` sequences with `own` generated tokens each."""
    total = 0
    for layer in layers:
        if layer.window is None:
            shared, mine = prompt_len, own
        else:  # the last `window` tokens: own ones first, then the prompt's end
            mine = min(own, layer.window)
            shared = min(prompt_len, layer.window - mine)
        total += (groups * shared + batch * mine) * layer.bytes_per_token
    return total


def causal_pairs(n: int, window: int | None) -> int:
    """(query, key) pairs of causal attention over n tokens; query i sees min(i + 1, window) keys."""
    if window is None or window >= n:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def attention_flops_per_pair(args) -> int:
    if args.kv_lora_rank:
        return 2 * args.num_attention_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim)
    return 4 * args.num_attention_heads * args.head_dim


def model_bytes(model) -> dict:
    """Parameter bytes by role: dense (read every decode step: attention, dense MLPs, shared
    experts, routers, norms, LM head), per-layer expert stacks (name, bytes, experts), embedding."""
    import torch

    seen, dense, experts, embed = set(), 0, [], 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        if name.rsplit(".", 1)[-1] in EXPERT_PARAMS:
            experts.append((name, nbytes, p.shape[0]))
        elif "embed_tokens" in name:
            embed = nbytes
        else:
            dense += nbytes
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return {"dense": dense + (embed if tied else 0), "experts": experts, "embed": embed, "tied": tied,
            "dtype_bytes": torch.empty((), dtype=next(model.parameters()).dtype).element_size()}


def active_bytes_per_token(args, mb: dict) -> float:
    """Weight bytes one token's forward uses (dense + its top-k experts; the embedding row aside)."""
    return mb["dense"] + sum(nbytes * args.num_experts_per_tok / e for _, nbytes, e in mb["experts"])


def physical_limit(w: dict, args, mb: dict, ceil: dict, max_num_seqs: int) -> dict:
    """Seconds an ideal engine needs: decode bytes / copy bandwidth + prefill FLOPs / matmul rate."""
    bw, rate = ceil["copy_bytes_per_s"], ceil["bf16_flops_per_s"]
    layers = kv_layers(args, mb["dtype_bytes"])
    n, prompt_len = w["n"], w["prompt_len"]
    total_seqs = w["num_prompts"] * n
    per_wave = max(1, min(total_seqs, max_num_seqs) // n) * n
    decode_s = 0.0
    left = total_seqs
    while left > 0:
        b = min(per_wave, left)
        weights = mb["dense"]
        for _, nbytes, e in mb["experts"]:  # expected distinct experts b tokens route to
            touched = e * (1 - (1 - args.num_experts_per_tok / e) ** b)
            weights += nbytes * touched / e
        for j in range(w["output_len"]):
            decode_s += (weights + step_kv_bytes(layers, b // n, b, prompt_len, j)) / bw
        left -= b
    dtype_bytes = mb["dtype_bytes"]
    lm_head = args.vocab_size * args.hidden_size * dtype_bytes
    active_params = (active_bytes_per_token(args, mb) - lm_head) / dtype_bytes
    tokens = w["num_prompts"] * prompt_len
    pair_flops = attention_flops_per_pair(args)
    attn = w["num_prompts"] * sum(pair_flops * causal_pairs(prompt_len, layer.window) for layer in layers)
    prefill_s = (2 * active_params * tokens + attn) / rate
    return {"decode_s": decode_s, "prefill_s": prefill_s, "total_s": decode_s + prefill_s,
            "kv_bytes_per_token": sum(layer.bytes_per_token for layer in layers)}
