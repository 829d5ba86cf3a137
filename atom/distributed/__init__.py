"""Tensor and expert parallelism over torch.distributed (NCCL / RCCL on GPUs, gloo on CPU).

`init_parallel(config, args)` builds this process's `ParallelState` from an existing default
process group, from torchrun's environment, or from `set_engine_group(pg)`; TP = EP = 1 needs
none of it. See parallel_state.py for the layouts and README.md for trainer-side usage.
"""
from atom.distributed.parallel_state import (CollectiveError, EngineLayout, ParallelGroup, ParallelState,
                                             check_shardable, init_parallel, set_engine_group)

__all__ = ["CollectiveError", "EngineLayout", "ParallelGroup", "ParallelState", "check_shardable",
           "init_parallel", "set_engine_group"]
