"""Host cost of routed-expert capture bookkeeping (issue 18): `python -m bench.routing_host`.

Replays, without a model, what the engine's host does with the routing of a grpo-moe rollout
(Qwen3-30B-A3B: 48 MoE layers, top-8; 64 prompts x n=8 = 512 sequences, 1024 prompt + 1024
output tokens, prefill chunks of 8192 tokens):

  prefill  the prefill steps' routing ([8192, 48, 8] int16 per step) recorded per sequence
  fork     the n=8 samples forked off each prompt (each gets the prompt's rows)
  decode   1023 decode steps of [512, 48, 8] int16 recorded (per step: this is what the overlapped
           loop hides behind the GPU step as long as the host's whole step stays shorter)
  outputs  Completion.routed_experts of all 512 sequences once they finish (the batch call's
           end, not overlapped with anything)

"before" is the bookkeeping of commit dec08e2 (a list of (start, view) chunks per sequence per
step, assembled into a fresh int32 array per output), kept here as the reference; "after" is
atom/engine/routing.py's RoutedStore. The device-to-host copies are not in it (a GPU's DMA), nor
the cudaHostAlloc that dec08e2 paid per decode step for a fresh pinned buffer (the runner now
reuses two). Times are CPU time of this process (time.process_time) and wall time.

Prediction for the GPU: the decode steps' share runs while the GPU computes the next step (the
GPU step is ~31.6 ms at 512 sequences, --gpu-step-ms) and costs nothing while the host's whole
step stays shorter; prefill, fork and outputs add to the wall time as they are.
"""
from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from atom import SamplingParams
from atom.engine.routing import RoutedStore, routed_experts
from atom.engine.sequence import Request, Sequence, SeqStatus


class LegacyChunks:
    """dec08e2's bookkeeping: per sequence and step a (first position, rows view) chunk; an
    output is assembled from the chunks into a new int32 array (-1 where none)."""

    def record(self, seqs, starts, counts, routed, owned: bool) -> None:
        if not owned:  # the runner's copy of a decode step: a fresh (pinned) host buffer per step
            routed = np.array(routed)
        row = 0
        for seq, n, start in zip(seqs, counts, starts):
            if seq.params.return_routed_experts:
                seq.routed_chunks.append((start, routed[row: row + n]))
            row += n

    def fork(self, parent, child) -> None:
        child.routed_chunks = list(parent.routed_chunks)

    def after_step(self) -> None:
        pass

    @staticmethod
    def output(seq) -> np.ndarray | None:
        if not seq.routed_chunks:
            return None
        _, first = seq.routed_chunks[0]
        out = np.full((max(len(seq) - 1, 0), *first.shape[1:]), -1, dtype=np.int32)
        for start, rows in seq.routed_chunks:
            rows = rows[: max(0, len(out) - start)]
            out[start: start + len(rows)] = rows
        return out


class StoreBookkeeping:
    def __init__(self, layers: int, top_k: int, max_model_len: int) -> None:
        self.store = RoutedStore(layers, top_k, max_model_len)

    def record(self, seqs, starts, counts, routed, owned: bool) -> None:
        self.store.record(seqs, starts, counts, routed, owned)

    def fork(self, parent, child) -> None:
        self.store.fork(parent, child)

    def after_step(self) -> None:  # Scheduler.update after an overlapped decode step
        self.store.drain()

    @staticmethod
    def output(seq) -> np.ndarray | None:
        return routed_experts(seq)


def _routing(rng: np.random.Generator, rows: int, layers: int, top_k: int, experts: int) -> np.ndarray:
    return rng.integers(0, experts, (rows, layers, top_k), dtype=np.int16)


def run(impl, a) -> dict:
    """Seconds (CPU, wall) of each phase with bookkeeping `impl`."""
    rng = np.random.default_rng(0)
    params = SamplingParams(n=a.n, max_tokens=a.output_len, ignore_eos=True, return_routed_experts=True)
    parents = []
    for i in range(a.prompts):
        prompt = rng.integers(0, 1000, a.prompt_len).tolist()
        seq = Sequence(Request(i, None, prompt, params, seed=i), 0, prompt)
        seq.routed_chunks = []
        parents.append(seq)
    per_step = max(1, a.prefill_tokens // a.prompt_len)
    prefill = [_routing(rng, per_step * a.prompt_len, a.layers, a.top_k, a.experts)
               for _ in range(-(-a.prompts // per_step))]
    # The decode steps' routing arrives in one of two staging buffers (the GPU's DMA target).
    steps = a.output_len - 1
    staging = [_routing(rng, a.prompts * a.n, a.layers, a.top_k, a.experts) for _ in range(2)]
    out = {}

    def timed(name, fn):
        c, w = time.process_time(), time.perf_counter()
        fn()
        out[name] = (time.process_time() - c, time.perf_counter() - w)

    def do_prefill():
        for k, rows in enumerate(prefill):
            group = parents[k * per_step: (k + 1) * per_step]
            impl.record(group, [0] * len(group), [a.prompt_len] * len(group), rows[: len(group) * a.prompt_len], True)
    timed("prefill", do_prefill)
    for seq in parents:  # every prompt sampled its n first tokens
        seq.num_computed = a.prompt_len
    seqs = []

    def do_fork():
        for parent in parents:
            seqs.append(parent)
            for j in range(1, a.n):
                child = Sequence(parent.request, j, parent.token_ids[: parent.num_prompt_tokens])
                impl.fork(parent, child)
                seqs.append(child)
    timed("fork", do_fork)
    starts, ones = [a.prompt_len] * len(seqs), [1] * len(seqs)

    walls = []

    def do_decode():
        for step in range(steps):
            rows = staging[step % 2]
            rows[:, 0, 0] = step  # (what the device wrote this step)
            w = time.perf_counter()
            impl.record(seqs, [s + step for s in starts], ones, rows, False)
            impl.after_step()
            walls.append(time.perf_counter() - w)
    timed("decode", do_decode)
    out["step_wall_ms"] = (float(np.median(walls)) * 1e3, max(walls) * 1e3)
    for seq in seqs:  # finished: prompt + output tokens
        seq.token_ids += rng.integers(0, 1000, a.output_len).tolist()
        seq.status = SeqStatus.FINISHED
    results = []
    timed("outputs", lambda: results.extend(impl.output(seq) for seq in seqs))
    assert all(r.shape == (a.prompt_len + a.output_len - 1, a.layers, a.top_k) for r in results)
    weight = np.arange(1, len(results[0]) + 1, dtype=np.int64)[:, None, None]  # rows in their places
    out["check"] = [int((r[:, :, :2] * weight).sum()) for r in results]  # the same both ways
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=8192)
    ap.add_argument("--gpu-step-ms", type=float, default=31.6, help="the GPU's decode step, for the prediction")
    ap.add_argument("--only", choices=["before", "after"], default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from bench.report import emit
    a.max_model_len = a.prompt_len + a.output_len
    impls = {"before": LegacyChunks, "after": lambda: StoreBookkeeping(a.layers, a.top_k, a.max_model_len)}
    result = {"bench": "routing_host", "sequences": a.prompts * a.n, "layers": a.layers, "top_k": a.top_k,
              "decode_steps": a.output_len - 1, "gpu_step_ms": a.gpu_step_ms}
    checks = {}
    for name, make in impls.items():
        if a.only not in (None, name):
            continue
        impl = make()
        gc.collect()
        r = run(impl, a)
        checks[name] = r.pop("check")
        p50, worst = r.pop("step_wall_ms")
        steps = a.output_len - 1
        end = sum(r[k][1] for k in ("prefill", "fork", "outputs"))
        result[name] = {
            **{f"{k}_cpu_s": round(v[0], 3) for k, v in r.items()},
            **{f"{k}_wall_s": round(v[1], 3) for k, v in r.items()},
            "decode_cpu_ms_per_step": round(r["decode"][0] / steps * 1e3, 3),
            "decode_step_wall_ms_p50": round(p50, 3), "decode_step_wall_ms_max": round(worst, 1),
            # Overlapped: the decode share is hidden; the rest adds to a rollout of steps x GPU step.
            "predicted_slowdown": round(end / (steps * a.gpu_step_ms / 1e3), 4),
            "predicted_slowdown_not_overlapped": round((end + r["decode"][1]) / (steps * a.gpu_step_ms / 1e3), 4)}
        del impl
        print(f"{name:6s}: " + ", ".join(f"{k} {v}" for k, v in result[name].items()), flush=True)
    if len(checks) == 2:
        result["same_rows"] = checks["before"] == checks["after"]
    emit(result, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
