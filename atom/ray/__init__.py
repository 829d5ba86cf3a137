"""atom on Ray (`pip install atom[ray]`): engine replicas as Ray actors behind one pool.

* `ReplicaPool(PoolConfig(engine_config, num_replicas=N, ...))`: replicas on a placement group
  (PACK / SPREAD, fractional GPUs to colocate with trainer actors), a batch `generate` sharded
  over them, `generate_async` routed by least outstanding requests with sticky request ids,
  `push` (one weight broadcast to every replica), `sleep` / `wake_up` / `pause_generation` /
  `resume_generation` / `stats` fanned out, and replica failures survived (Ray restarts the
  actor, the pool resynchronises its weights before it serves again).
* `WeightBroadcast`: the trainer side of that broadcast, picklable for a trainer Ray actor.
See README.md ("Scaling out on Ray").
"""
from atom.ray.config import PoolConfig
from atom.ray.pool import ReplicaPool
from atom.ray.replicas import FailureEvent
from atom.ray.router import Router, sticky_key
from atom.ray.routing import RequestAborted
from atom.ray.weights import PushResult, WeightBroadcast

__all__ = ["PoolConfig", "ReplicaPool", "WeightBroadcast", "PushResult", "FailureEvent", "RequestAborted",
           "Router", "sticky_key"]
