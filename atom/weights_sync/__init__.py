"""Weight synchronisation between a trainer and rollout engines.

* In-process (colocated): `RolloutEngine.update_weights(pairs)` or `push(model, engine)`.
* Over the network: the trainer and every engine rank join `init_weight_sync_group(...)`
  (its own TCPStore and process group); the trainer sends with `WeightSender` (or
  `push(model, sender)`), each engine rank receives with `WeightReceiver(engine, group).receive()`.
* Per-tensor broadcasts (OpenRLHF / TRL / SGLang shape): the engine joins with
  `RolloutEngine.init_weights_update_group`, the trainer sends with `send_tensors` after
  announcing names, dtypes and shapes to `update_weights_from_distributed`.
* Same device, another process: `IpcBucketSender` -> `RolloutEngine.update_weights_from_ipc`,
  `serialize_tensors` -> `RolloutEngine.update_weights_from_tensor`.
See README.md (RL features).
"""
from atom.weights_sync.ipc import IpcBucketSender, serialize_tensors
from atom.weights_sync.group import (WeightSyncError, WeightSyncGroup, WeightSyncTimeout,
                                     init_weight_sync_group)
from atom.weights_sync.protocol import DEFAULT_BUCKET_BYTES
from atom.weights_sync.push import hf_name, push
from atom.weights_sync.receiver import WeightReceiver
from atom.weights_sync.sender import WeightRejected, WeightSender
from atom.weights_sync.tensor_sync import send_tensors

__all__ = ["init_weight_sync_group", "WeightSyncGroup", "WeightSender", "WeightReceiver", "push", "hf_name",
           "WeightSyncError", "WeightSyncTimeout", "WeightRejected", "DEFAULT_BUCKET_BYTES", "IpcBucketSender",
           "serialize_tensors", "send_tensors"]
