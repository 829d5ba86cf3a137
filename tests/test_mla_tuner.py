"""The MLA decode tuner's choice per group (bench.mla_kernels.sweep_group), on made-up times: no
GPU needed. Session 8 found the tuner had never picked anything: its best score started at 1.0
while the score summed the ratios of three cases."""
from __future__ import annotations

from bench.mla_kernels import sweep_group

BASE = {"prefix_dv": 256, "reuse": False, "warps": 4}
# Seconds per case (three cases, as the tuner's shared cases) for each (prefix_dv, reuse).
TIMES = {(256, False): [377e-6, 205e-6, 485e-6], (512, True): [283e-6, 120e-6, 365e-6],
         (512, False): [370e-6, 200e-6, 480e-6], (128, False): [519e-6, 208e-6, 582e-6]}


def times_of(cfg: dict) -> list[float]:
    key = (cfg["prefix_dv"], cfg["reuse"])
    if key not in TIMES:
        raise RuntimeError("out of shared memory")  # as a config that does not fit
    return TIMES[key]


def test_the_fastest_candidate_on_every_case_is_picked_with_the_other_keys_kept():
    best = sweep_group(BASE, ("prefix_dv", "reuse"), [(256, False), (512, True), (512, False), (128, False)], times_of)
    assert best == {"prefix_dv": 512, "reuse": True, "warps": 4}


def test_a_gain_within_the_margin_keeps_the_current_config():
    # (512, False) is 1-2% faster than the base: noise, not a reason to change.
    assert sweep_group(BASE, ("prefix_dv", "reuse"), [(512, False), (128, False)], times_of) is None


def test_a_candidate_that_fails_is_skipped():
    best = sweep_group(BASE, ("prefix_dv", "reuse"), [(64, True), (512, True)], times_of)
    assert best is not None and best["prefix_dv"] == 512
