"""Random ("dummy") weights: build an engine from a config.json alone (benchmarks, smoke tests).

`EngineConfig(load_format="dummy")` fills every parameter in place with small random normal
values (norm weights 1, biases 0) from a generator seeded by `seed`, on the parameter's device.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    seen: set[int] = set()
    generators: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim == 1:
            p.fill_(1.0) if "norm" in name else p.zero_()
            continue
        gen = generators.get(p.device)
        if gen is None:
            gen = generators[p.device] = torch.Generator(device=p.device)
            gen.manual_seed(seed)
        p.normal_(0.0, std, generator=gen)
