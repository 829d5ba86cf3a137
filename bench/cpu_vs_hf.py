"""atom against HF transformers' `generate` on the CPU, side by side in one process:
`python -m bench.cpu_vs_hf [--threads N] [--rounds R] [--sets chat16,default]`.

The embedded default model (SmolLM2-135M-Instruct, fp32) on two prompt sets, greedy, 64 new
tokens each, EOS ignored:
  chat16:  the default job's 8 chat prompts, each twice (16 prompts, half of them repeats);
  default: the default job's 8 chat prompts.
HF runs one left-padded batch per set (its plain `generate`, KV cache on, no EOS: it neither
stops nor suppresses it, as atom's ignore_eos); atom runs one generate call with an empty
prefix cache (repeats within a set still share). Both run once untimed first (atom packs its
weights then), then rounds alternate atom and HF. Both use the same torch threads (the
setting is process-wide; the engine is told the same count).

Reported per set: tokens/s by wall clock and by process CPU time (best round of each), their
ratios, and the median of the per-round ratios. On a machine shared with other work the CPU
time is the steadier measure (wall time counts the time other processes held the cores); the
load average is printed with the results. Correctness: atom's greedy tokens must equal HF's
unpadded forward (each prompt alone, batch 1), checked once per set, untimed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from bench.report import emit

NEW_TOKENS = 64


def prompt_sets() -> dict[str, list]:
    path = Path(__file__).resolve().parents[1] / "atom" / "rollout" / "data" / "default_prompts.jsonl"
    chats = [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]
    return {"chat16": chats + chats, "default": chats}


def run_hf(model, tok, ids: list[list[int]]) -> list[list[int]]:
    """HF generate on one left-padded batch: greedy, NEW_TOKENS tokens, EOS neither stops nor is banned."""
    import torch
    width = max(len(x) for x in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    with torch.inference_mode():
        out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=pad)
    return out[:, width:].tolist()


def hf_unpadded(model, tok, ids: list[list[int]]) -> list[list[int]]:
    """HF's greedy tokens for each prompt alone (no padding), computed once per distinct prompt."""
    done: dict[tuple, list[int]] = {}
    for x in ids:
        if tuple(x) not in done:
            done[tuple(x)] = run_hf(model, tok, [x])[0]
    return [done[tuple(x)] for x in ids]


def _timed(fn) -> tuple[float, float, object]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def compare(engine, hf, name: str, prompts: list, rounds: int) -> dict:
    from atom import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ids = [engine.tokenize(p) for p in prompts]
    tokens = len(ids) * NEW_TOKENS

    def atom_call():
        engine.reset_prefix_cache()  # every call pays its prefills (repeats within the set still share)
        return engine.generate(ids, sp)

    atom_call(), run_hf(hf, engine.tokenizer, ids)  # warm-up (atom packs its weights here)
    stats0 = engine.stats.prompt_tokens_computed, engine.stats.prompt_tokens_cached
    walls, cpus, same_padded, outs = {"atom": [], "hf": []}, {"atom": [], "hf": []}, True, None
    for r in range(rounds):
        wall, cpu, outs = _timed(atom_call)
        walls["atom"].append(wall), cpus["atom"].append(cpu)
        wall, cpu, hf_tokens = _timed(lambda: run_hf(hf, engine.tokenizer, ids))
        walls["hf"].append(wall), cpus["hf"].append(cpu)
        same_padded &= [o.outputs[0].token_ids for o in outs] == hf_tokens
        print(f"  {name} round {r}: atom {tokens / walls['atom'][-1]:.1f} tok/s ({tokens / cpus['atom'][-1]:.1f} "
              f"per CPU s), HF {tokens / walls['hf'][-1]:.1f} ({tokens / cpus['hf'][-1]:.1f}); load "
              f"{os.getloadavg()[0]:.1f}", flush=True)
    computed = (engine.stats.prompt_tokens_computed - stats0[0]) // rounds
    cached = (engine.stats.prompt_tokens_cached - stats0[1]) // rounds
    got = [o.outputs[0].token_ids for o in outs]
    res = {
        "atom_tok_s": tokens / min(walls["atom"]), "hf_tok_s": tokens / min(walls["hf"]),
        "atom_tok_cpu_s": tokens / min(cpus["atom"]), "hf_tok_cpu_s": tokens / min(cpus["hf"]),
        "median_round_ratio_wall": statistics.median(h / a for a, h in zip(walls["atom"], walls["hf"])),
        "median_round_ratio_cpu": statistics.median(h / a for a, h in zip(cpus["atom"], cpus["hf"])),
        "greedy_equal_to_hf_unpadded": got == hf_unpadded(hf, engine.tokenizer, ids),
        "greedy_equal_to_hf_padded": same_padded,
        "prompt_tokens_atom_computed": computed, "prompt_tokens_atom_cached": cached,
        "prompt_tokens_hf_padded": len(ids) * max(len(x) for x in ids),
    }
    res["ratio_wall"] = res["atom_tok_s"] / res["hf_tok_s"]
    res["ratio_cpu"] = res["atom_tok_cpu_s"] / res["hf_tok_cpu_s"]
    print(f"{name}: atom {res['atom_tok_s']:.1f} tok/s, HF generate {res['hf_tok_s']:.1f} -> {res['ratio_wall']:.2f}x "
          f"(per CPU second: {res['atom_tok_cpu_s']:.1f} vs {res['hf_tok_cpu_s']:.1f} -> {res['ratio_cpu']:.2f}x; "
          f"median round {res['median_round_ratio_wall']:.2f}x / {res['median_round_ratio_cpu']:.2f}x); "
          f"greedy equal to HF unpadded: {res['greedy_equal_to_hf_unpadded']}; prompt tokens computed "
          f"{computed} (cached {cached}) vs HF's padded {res['prompt_tokens_hf_padded']}", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: atom's choice)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sets", default="chat16,default", help="comma-separated prompt sets")
    ap.add_argument("--op-backends", default=None, help='JSON op overrides for atom, e.g. \'{"linear": "torch"}\'')
    ap.add_argument("--json", default=None, help="append the result line to this file")
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from atom import RolloutEngine
    from atom.rollout.default_model import ensure_default_checkpoint

    path = ensure_default_checkpoint()
    load_before = os.getloadavg()[0]
    overrides = json.loads(args.op_backends) if args.op_backends else {}
    engine = RolloutEngine(path, device="cpu", cpu_threads=args.threads or 0, op_backends=overrides)
    threads = torch.get_num_threads()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sets = prompt_sets()
    results = {name: compare(engine, hf, name, sets[name], args.rounds) for name in args.sets.split(",")}
    result = {"threads": threads, "load_before": load_before, "load_after": os.getloadavg()[0],
              "op_backends": overrides, **results}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
