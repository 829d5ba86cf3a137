"""atom against HF transformers' `generate` on the CPU, side by side in one process:
`python -m bench.cpu_vs_hf [--threads N] [--rounds R]`.

The embedded default model (SmolLM2-135M-Instruct, fp32) on two prompt sets, greedy, 64 new
tokens each (ignore_eos):
  chat16:  the default job's 8 chat prompts, each twice (16 prompts, half of them repeats);
  default: the default job's 8 chat prompts.
HF runs one left-padded batch per set (its plain `generate`, KV cache on); atom runs one generate
call. Rounds alternate atom and HF; the best round of each is reported, with the ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

NEW_TOKENS = 64


def prompt_sets() -> dict[str, list]:
    path = Path(__file__).resolve().parents[1] / "atom" / "rollout" / "data" / "default_prompts.jsonl"
    chats = [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]
    return {"chat16": chats + chats, "default": chats}


def run_hf(model, tok, ids: list[list[int]]):
    import torch
    width = max(len(x) for x in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    with torch.inference_mode():
        out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
    return out[:, width:].tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: atom's choice)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from atom import RolloutEngine, SamplingParams
    from atom.rollout.default_model import ensure_default_checkpoint

    path = ensure_default_checkpoint()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    engine = RolloutEngine(path, device="cpu")
    threads = torch.get_num_threads()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = {}
    for name, prompts in prompt_sets().items():
        ids = [engine.tokenize(p) for p in prompts]
        best = {"atom": 0.0, "hf": 0.0}
        same = None
        for r in range(args.rounds):
            engine.reset_prefix_cache()  # every atom round pays its prefills (repeats within a set still share)
            t0 = time.perf_counter()
            outs = engine.generate(ids, sp)
            best["atom"] = max(best["atom"], len(ids) * NEW_TOKENS / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            hf_tokens = run_hf(hf, engine.tokenizer, ids)
            best["hf"] = max(best["hf"], len(ids) * NEW_TOKENS / (time.perf_counter() - t0))
            same = [o.outputs[0].token_ids for o in outs] == hf_tokens
            print(f"  {name} round {r}: atom {best['atom']:.1f} tok/s, HF {best['hf']:.1f} tok/s (best so far)",
                  flush=True)
        results[name] = {**best, "ratio": best["atom"] / best["hf"], "greedy_equal_to_hf_padded": same}
        print(f"{name}: atom {best['atom']:.1f} tok/s, HF generate {best['hf']:.1f} tok/s -> "
              f"{best['atom'] / best['hf']:.2f}x (greedy tokens equal to HF's padded batch: {same})")
    result = {"threads": threads, **results}
    print("RESULT " + json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
