"""Where the device waited: the idle gaps of a torch-profiler chrome trace, and what the host
was doing in them.

    python -m bench.trace_gaps TRACE.json [--min-us 20] [--top 25]

The device is busy while any kernel or device copy runs (the union over streams); a gap is an
interval between busy ones. Each gap is charged to the host: for every instant of the gap, the
innermost CPU event running on the busiest host thread (a Python function when the trace was
taken with stacks, else an aten op or CUDA runtime call). Prints the total idle time, the idle
time by innermost host event, and the longest gaps with the host's stack at their middle. The
point is to find the host work the device waits for (a sync, a per-layer Python loop) in a trace
too large to read by hand (the prefill window of a rollout is ~100 MB).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


@dataclass(frozen=True)
class Span:
    start: float
    end: float
    name: str


def device_intervals(events: list[dict]) -> list[list]:
    """The union of the device's kernel / copy intervals, merged and sorted: [start, end, first
    kernel's name, last kernel's name] (µs)."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "?")) for e in events
                   if e.get("cat") in DEVICE_CATS)
    merged: list[list] = []
    for a, b, name in spans:
        if merged and a <= merged[-1][1]:
            if b >= merged[-1][1]:
                merged[-1][1], merged[-1][3] = b, name
        else:
            merged.append([a, b, name, name])
    return merged


def device_busy(events: list[dict]) -> list[tuple[float, float]]:
    """The union of the device's kernel / copy intervals, merged and sorted (µs)."""
    return [(a, b) for a, b, _, _ in device_intervals(events)]


def gaps_of(busy: list[tuple[float, float]], min_us: float) -> list[tuple[float, float]]:
    return [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] >= min_us]


def idle_by_transition(intervals: list[list], min_us: float) -> dict[str, float]:
    """Idle time by the pair of kernels around it ('previous -> next', names cut to 40)."""
    out: dict[str, float] = defaultdict(float)
    for x, y in zip(intervals, intervals[1:]):
        if y[0] - x[1] >= min_us:
            out[f"{x[3][:40]} -> {y[2][:40]}"] += y[0] - x[1]
    return out


def host_spans(events: list[dict]) -> list[Span]:
    """The CPU events of the host thread with the most event time (the engine's thread)."""
    by_tid: dict = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") not in DEVICE_CATS and "dur" in e and e.get("cat") != "ac2g":
            by_tid[(e.get("pid"), e.get("tid"))].append(e)
    if not by_tid:
        return []
    main = max(by_tid.values(), key=lambda es: sum(e["dur"] for e in es))
    return sorted((Span(e["ts"], e["ts"] + e["dur"], e["name"]) for e in main), key=lambda s: (s.start, -s.end))


class HostSweep:
    """The host events live in each gap, found in one pass over the (nested, start-sorted) spans:
    a stack of the events open at the gap's start, plus those starting inside it."""

    def __init__(self, spans: list[Span]) -> None:
        self.spans, self.next, self.open = spans, 0, []

    def inside(self, a: float, b: float) -> list[Span]:
        spans, open_ = self.spans, self.open
        while self.next < len(spans) and spans[self.next].start < a:
            s = spans[self.next]
            while open_ and open_[-1].end <= s.start:
                open_.pop()
            open_.append(s)
            self.next += 1
        while open_ and open_[-1].end <= a:
            open_.pop()
        live = [s for s in open_ if s.end > a]
        i = self.next
        while i < len(spans) and spans[i].start < b:
            live.append(spans[i])
            i += 1
        return live


def charge(inside: list[Span], gap: tuple[float, float], into: dict[str, float]) -> None:
    """Adds each instant of the gap to the innermost host event running then ('<idle host>' when
    none: the host between events). `inside`: the gap's events in start order, nested."""
    a, b = gap
    t, stack = a, []

    def until(end: float) -> None:  # charge [t, end) to what is open, closing what ends first
        nonlocal t
        while stack and stack[-1].end <= end:
            top = stack.pop()
            if top.end > t:
                into[top.name] += top.end - t
                t = top.end
        if end > t:
            into[stack[-1].name if stack else "<idle host>"] += end - t
            t = end

    for s in inside:
        until(min(max(s.start, a), b))
        stack.append(s)
    until(b)


def analyse(trace: dict, min_us: float = 20.0, top: int = 25) -> str:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    intervals = device_intervals(events)
    busy = [(a, b) for a, b, _, _ in intervals]
    if not busy:
        return "no device events in the trace\n"
    wall = busy[-1][1] - busy[0][0]
    busy_us = sum(b - a for a, b in busy)
    gaps = gaps_of(busy, min_us)
    spans = host_spans(events)
    lines = [f"device window {wall / 1e3:.2f} ms: busy {busy_us / 1e3:.2f} ms in {len(busy)} intervals, idle "
             f"{(wall - busy_us) / 1e3:.2f} ms ({(wall - busy_us) / max(len(busy) - 1, 1):.2f} us between intervals "
             f"on average); {len(gaps)} gaps >= {min_us:g} us hold {sum(b - a for a, b in gaps) / 1e3:.2f} ms"]
    charged: dict[str, float] = defaultdict(float)
    longest = sorted(gaps, key=lambda g: g[0] - g[1])[:top]
    sweep, stacks, shown = HostSweep(spans), {}, set(longest)
    for a, b in gaps:
        inside = sweep.inside(a, b)  # outermost first
        charge(inside, (a, b), charged)
        if (a, b) in shown:
            mid = (a + b) / 2
            stacks[(a, b)] = [s for s in inside if s.start <= mid < s.end]
    lines.append("\nidle time by innermost host event (ms):")
    for name, us in sorted(charged.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {us / 1e3:9.2f}  {name[:150]}")
    lines.append("\nidle time by the kernels around it (ms):")
    for name, us in sorted(idle_by_transition(intervals, min_us).items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {us / 1e3:9.2f}  {name}")
    lines.append(f"\nthe {top} longest gaps (start from the window's start, ms; the host stack at the middle):")
    for a, b in longest:
        chain = " > ".join(s.name[:60] for s in stacks[(a, b)][-6:]) or "<idle host>"
        lines.append(f"  {(a - busy[0][0]) / 1e3:9.2f}  {(b - a) / 1e3:7.3f} ms  {chain}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--min-us", type=float, default=20.0, help="shorter idle intervals are not gaps")
    ap.add_argument("--top", type=int, default=25)
    opts = ap.parse_args(argv)
    with open(opts.trace) as f:
        trace = json.load(f)
    print(analyse(trace, opts.min_us, opts.top), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
