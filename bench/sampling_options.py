"""What the sampling options cost on the CPU (issue 15): `python -m bench.sampling_options`.

sampler: one decode step's sampling as the engine runs it (the penalty state's bookkeeping,
    metadata built from real sequences, the CPU backend's sampler, the sampled tokens counted
    into the penalty state and appended) at the default model's vocabulary (49,152), B rows with
    prompts of 256 and 192 generated tokens each.
e2e: greedy rollouts of the default model (SmolLM2-135M), 16 prompts x 64 tokens, generated
    tokens per second.
Each configuration runs in turn, `--repeats` rounds, median reported. Times are this process's
CPU time (one thread), not wall time: the 2-core machine is shared, and CPU time is what the
work costs. Settings this checkout does not know (an older one, to compare "off" against) are
skipped.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from atom import SamplingParams

VOCAB = 49152
CONFIGS = {
    "off, logprobs=None": dict(),
    "off, logprobs=0": dict(logprobs=0),
    "repetition_penalty=1.1, logprobs=0": dict(logprobs=0, repetition_penalty=1.1),
    "rep+presence+frequency, logprobs=0": dict(logprobs=0, repetition_penalty=1.1, presence_penalty=0.5,
                                               frequency_penalty=0.5),
    "logit_bias (4 tokens) + allowed (1000), logprobs=0": dict(
        logprobs=0, logit_bias={5: 1.0, 6: -1.0, 7: 2.0, 8: 0.5}, allowed_token_ids=list(range(1000))),
}


def known(kw: dict) -> bool:
    try:
        SamplingParams(**kw)
        return True
    except TypeError:
        return False


def sampler_rows(rows: int, kw: dict) -> list:
    from atom.engine.sequence import Request, Sequence
    g = torch.Generator().manual_seed(0)
    seqs = []
    for r in range(rows):
        prompt = torch.randint(0, VOCAB, (256,), generator=g).tolist()
        p = SamplingParams(temperature=1.0, seed=r, max_tokens=100000, **kw)
        generated = torch.randint(0, VOCAB, (192,), generator=g).tolist()
        seq = Sequence(Request(r, None, prompt, p, seed=r), 0, prompt + generated)
        seq.fork_pending = False
        seqs.append((seq, 0))
    return seqs


def sampler_step(seqs: list, logits: torch.Tensor, state) -> float:
    """Seconds of one step: penalty rows, metadata, sampling, the tokens counted and appended."""
    from atom.engine.sampler import sampling_metadata
    from atom.ops import ops
    t0 = time.process_time()
    pen = state.prepare(seqs)
    meta = sampling_metadata(seqs, [2], torch.device("cpu"), penalties=pen)
    out = ops.sample(logits, meta)
    if pen is not None:
        state.count(pen, meta.processing.penalty_slots, out.token_ids)
    dt = time.process_time() - t0
    for (seq, _), tok in zip(seqs, out.token_ids.tolist()):
        seq.token_ids.append(tok)
    return dt


def e2e(kw: dict, engine) -> float:
    """Generated tokens per CPU second of one call."""
    prompts = [[1] + list(range(100 + 7 * i, 140 + 7 * i)) for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, **kw)
    t0 = time.process_time()
    outs = engine.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.process_time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", choices=["sampler", "e2e", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--off-only", action="store_true", help="only the configurations without options")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from atom.engine.penalties import PenaltyState
    configs = {k: v for k, v in CONFIGS.items() if known(v) and (not args.off_only or k.startswith("off"))}
    if args.what in ("sampler", "both"):
        for rows in (16, 64):
            logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(1)) * 3
            batches = {name: sampler_rows(rows, kw) for name, kw in configs.items()}
            states = {name: PenaltyState(rows, VOCAB, 4096, torch.device("cpu")) for name in configs}
            times = {name: [] for name in configs}
            for i in range(args.repeats + 1):  # configurations take turns; the first round warms up
                for name, seqs in batches.items():  # (and fills the penalty slots)
                    dt = sampler_step(seqs, logits, states[name])
                    if i:
                        times[name].append(dt)
            for name, t in times.items():
                print(f"sampler B={rows:3d} {name:52s} {1e3 * statistics.median(t):8.2f} ms CPU (min {1e3 * min(t):.2f})")
    if args.what in ("e2e", "both"):
        from atom import RolloutEngine
        from atom.rollout.default_model import ensure_default_checkpoint
        engine = RolloutEngine(ensure_default_checkpoint(), max_model_len=256, device="cpu")
        e2e({}, engine)  # warm-up
        rates = {name: [] for name in configs}
        for _ in range(args.repeats):  # configurations take turns: machine noise hits all alike
            for name, kw in configs.items():
                rates[name].append(e2e(kw, engine))
        for name, r in rates.items():
            print(f"e2e 16 x 64 tokens {name:52s} {statistics.median(r):8.1f} tok/CPU-s (runs {min(r):.1f}..{max(r):.1f})")


if __name__ == "__main__":
    main()
