"""Weight synchronisation between a trainer and rollout engines.

* In-process (colocated): `RolloutEngine.update_weights(pairs)` or `push(model, engine)`.
* Over the network: the trainer and every engine rank join `init_weight_sync_group(...)`
  (its own TCPStore and process group); the trainer sends with `WeightSender` (or
  `push(model, sender)`), each engine rank receives with `WeightReceiver(engine, group).receive()`.
See README.md (RL features).
"""
from atom.weights_sync.group import (WeightSyncError, WeightSyncGroup, WeightSyncTimeout,
                                     init_weight_sync_group)
from atom.weights_sync.protocol import DEFAULT_BUCKET_BYTES
from atom.weights_sync.push import hf_name, push
from atom.weights_sync.receiver import WeightReceiver
from atom.weights_sync.sender import WeightRejected, WeightSender

__all__ = ["init_weight_sync_group", "WeightSyncGroup", "WeightSender", "WeightReceiver", "push", "hf_name",
           "WeightSyncError", "WeightSyncTimeout", "WeightRejected", "DEFAULT_BUCKET_BYTES"]
