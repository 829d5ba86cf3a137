"""bench/trace_gaps.py: device gaps of a chrome trace and the host events charged with them."""
from bench.trace_gaps import analyse, device_busy, gaps_of


def _k(ts, dur, name="k", stream=7):
    return {"ph": "X", "cat": "kernel", "ts": ts, "dur": dur, "name": name, "pid": 0, "tid": stream}


def _h(ts, dur, name):
    return {"ph": "X", "cat": "cpu_op", "ts": ts, "dur": dur, "name": name, "pid": 1, "tid": 1}


def test_busy_union_over_streams_and_gaps():
    events = [_k(0, 10), _k(5, 10, stream=8), _k(40, 5), _k(46, 4), _k(100, 1)]
    busy = device_busy(events)
    assert busy == [(0, 15), (40, 45), (46, 50), (100, 101)]
    assert gaps_of(busy, 20) == [(15, 40), (50, 100)]


def test_idle_time_charged_to_the_innermost_host_event():
    events = [_k(0, 10, "gemm"), _k(110, 10, "norm"),
              _h(5, 200, "step"), _h(20, 60, "sample"), _h(30, 40, "cudaStreamSynchronize"), _h(150, 10, "late")]
    text = analyse({"traceEvents": events}, min_us=20, top=5)
    # gap 10..110: step 10-20 and 80-110 (40 us), sample 20-30 and 70-80 (20), the sync 30-70 (40)
    section = text.split("innermost host event (ms):\n")[1].split("\n\n")[0]
    lines = {ln.split()[-1]: float(ln.split()[0]) for ln in section.splitlines()}
    assert lines == {"step": 0.04, "sample": 0.02, "cudaStreamSynchronize": 0.04}
    assert "0.100 ms  step > sample > cudaStreamSynchronize" in text
    assert "idle 0.10 ms" in text and "in 2 intervals" in text
    assert "0.10  gemm -> norm" in text
