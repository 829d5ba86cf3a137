"""examples/routing_replay.py runs as written and replay closes most of the logprob gap."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def test_routing_replay_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "routing_replay.py"
    spec = importlib.util.spec_from_file_location("routing_replay_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gaps = module.main()
    assert gaps["replayed"] < gaps["own routing"] / 3 and gaps["replayed"] < 0.2
