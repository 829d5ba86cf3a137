"""What frameworks reach for inside vLLM's engine: the driver worker, its model runner and the
model's `load_weights`, and the worker methods they call through `LLM.collective_rpc`.

`llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(pairs)` (TRL's
colocate path, verl, NeMo-RL) streams HF-named tensors into the engine. The weight-transfer
methods are those of the frameworks' own vLLM worker extensions, with the same arguments:

* OpenRLHF: `init_process_group(master_address, master_port, rank_offset, world_size,
  group_name, backend)`, `update_weight(name, dtype, shape)` (trainer = rank 0, its group built
  with OpenRLHF's own helper or atom's `init_weight_sync_group`: the same store layout);
* TRL (vllm-serve): `init_communicator(host, port, world_size)`, `update_named_param(name,
  dtype, shape)`, `batch_update_named_params(params)`, `close_communicator()` (trainer = the last rank);
* CUDA IPC of trainer tensors: `update_weights_from_ipc_handles` / `update_weight_cuda_ipc`;
* vLLM's own: `sleep`, `wake_up`, `reset_prefix_cache`, `reload_weights`, `report_device_id`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

import torch

from atom.weights_sync.tensor_sync import parse_dtype


class Model:
    """The engine's model as vLLM's workers expose it: `load_weights` is what callers need."""

    def __init__(self, engine) -> None:
        self._rollout = engine

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load (HF name, tensor) pairs into the running model, any subset of them (as vLLM's
        load_weights does); returns the names loaded. The weight version does not change.

        A list, tuple or dict (a state_dict) is checked whole before the first copy, so a bad
        tensor anywhere in it (unknown name, wrong shape, not floating) raises ValueError and
        changes nothing; other iterables (verl's generators) stream one tensor at a time, as
        update_weights does."""
        if isinstance(weights, Mapping):
            weights = list(weights.items())
        if isinstance(weights, (list, tuple)):
            weights = list(weights)
            self._rollout.update_weights(weights, partial=True, version=self._rollout.weight_version)
            return {item[0] for item in weights}
        names: set[str] = set()

        def streamed():  # one tensor at a time, as the caller hands them over
            for item in weights:
                if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
                    names.add(item[0])
                yield item
        self._rollout.update_weights(streamed(), partial=True, version=self._rollout.weight_version)
        return names


class ModelRunner:
    def __init__(self, engine) -> None:
        self.model = Model(engine)


class Worker:
    """vLLM's (driver) worker over one RolloutEngine; `worker_extension_cls` is mixed in front."""

    def __init__(self, engine, rank: int = 0) -> None:
        self.rollout_engine = engine
        self.model_runner = ModelRunner(engine)
        self.rank = rank
        self.local_rank = rank
        self.device = engine.config.torch_device()

    # ---- vLLM's own worker methods -------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        self.rollout_engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.rollout_engine.wake_up(tags)

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        return self.rollout_engine.reset_prefix_cache(reset_running_requests)

    def reload_weights(self, weights_iterator: Iterable[tuple[str, torch.Tensor]] | None = None,
                       weights_path: str | None = None, is_checkpoint_format: bool = True) -> None:
        """vLLM's `collective_rpc("reload_weights")`: load the weights again in place, from
        `weights_iterator` ((HF name, tensor) pairs, any subset), else from the safetensors
        checkpoint at `weights_path`, else from the model's own checkpoint (what vLLM's sleep
        level 2 recipe calls after `wake_up(tags=["weights"])`). The weight version does not
        change; a checkpoint must be complete (a missing tensor raises ValueError)."""
        if not is_checkpoint_format:
            raise ValueError("reload_weights: is_checkpoint_format=False (tensors in the engine's own layout) is not "
                             "supported; pass HF-named tensors")
        if weights_iterator is not None:
            if weights_path is not None:
                raise ValueError("reload_weights: pass weights_iterator or weights_path, not both")
            self.model_runner.model.load_weights(weights_iterator)
            return
        from atom.models.weights import iter_checkpoint
        engine = self.rollout_engine
        path = weights_path if weights_path is not None else engine.config.model
        if not isinstance(path, str) or not path:
            raise ValueError(f"reload_weights: no checkpoint to reload from (weights_path={weights_path!r})")
        engine.update_weights(iter_checkpoint(path), version=engine.weight_version)

    def report_device_id(self) -> str:
        """The device's UUID (CUDA), as NeMo-RL and verl match trainer and engine GPUs; "cpu" on CPU."""
        if self.device.type != "cuda":
            return "cpu"
        return str(torch.cuda.get_device_properties(self.device).uuid)

    # ---- OpenRLHF --------------------------------------------------------------------------
    def init_process_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                           group_name: str = "atom_weight_sync", backend: str = "nccl", use_ray: bool = False) -> None:
        if use_ray:
            raise ValueError("init_process_group: use_ray=True (a Ray collective group) is not supported; "
                             "atom joins a torch process group")
        self.rollout_engine.init_weights_update_group(master_address, master_port, rank_offset + self.rank,
                                                      world_size, group_name=group_name, backend=backend, src=0)

    def update_weight(self, name: str, dtype, shape, empty_cache: bool = False) -> None:
        self.rollout_engine.update_weights_from_distributed([name], [dtype], [shape], flush_cache=True)

    def update_weight_cuda_ipc(self, name: str, dtype, shape, ipc_handles: dict | None = None,
                               empty_cache: bool = False) -> None:
        """OpenRLHF's IPC path: ipc_handles maps device UUIDs to `reduce_tensor` handles."""
        if ipc_handles is None:
            raise ValueError("update_weight_cuda_ipc: ipc_handles is required")
        handle = ipc_handles.get(self.report_device_id(), None) if isinstance(ipc_handles, dict) else ipc_handles
        if handle is None:
            raise ValueError(f"update_weight_cuda_ipc: no handle for this device ({self.report_device_id()})")
        func, args = handle
        tensor = func(*_on_this_device(func, tuple(args), self.device))
        self.rollout_engine.update_weights_from_tensor([(name, _checked(name, tensor, dtype, shape))])

    # ---- TRL (vllm-serve's worker extension) --------------------------------------------------
    def init_communicator(self, host: str, port: int, world_size: int, client_device_uuid: str | None = None) -> None:
        self.rollout_engine.init_weights_update_group(host, port, self.rank, world_size, backend=_backend(self.device),
                                                      src=world_size - 1)

    def update_named_param(self, name: str, dtype, shape) -> None:
        self.rollout_engine.update_weights_from_distributed([name], [dtype], [shape], flush_cache=True)

    def batch_update_named_params(self, params_list: Iterable[tuple[str, Any, Any]]) -> None:
        """Several update_named_param calls in one: (name, dtype, shape) each, one broadcast per
        tensor in this order; all are received before any is loaded."""
        params = list(params_list)
        bad = next((p for p in params if not (isinstance(p, (tuple, list)) and len(p) == 3)), None)
        if bad is not None:
            raise TypeError(f"batch_update_named_params: expected (name, dtype, shape) triples, got {bad!r:.80}")
        names, dtypes, shapes = ([p[i] for p in params] for i in range(3))
        self.rollout_engine.update_weights_from_distributed(names, dtypes, shapes, flush_cache=True)

    def close_communicator(self) -> None:
        self.rollout_engine.destroy_weights_update_group()

    # ---- IPC of trainer tensors (NeMo-RL / verl shape) ----------------------------------------
    def update_weights_from_ipc_handles(self, ipc_handles: Any) -> bool:
        """Buckets packed by atom.weights_sync.ipc (bytes, or a per-device dict of them)."""
        if isinstance(ipc_handles, dict):
            ipc_handles = ipc_handles[self.report_device_id()]
        self.rollout_engine.update_weights_from_ipc(ipc_handles)
        return True


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _on_this_device(func: Any, args: tuple, device: torch.device) -> tuple:
    """A CUDA `reduce_tensor` handle made in the trainer's process names the device by its
    index there; with another CUDA_VISIBLE_DEVICES here that index is another GPU, so point it
    at this worker's device (as OpenRLHF's worker does). Other handles pass unchanged."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    if func is rebuild_cuda_tensor and device.type == "cuda" and len(args) > 6:
        args = args[:6] + (device.index if device.index is not None else torch.cuda.current_device(),) + args[7:]
    return args


def _checked(name: str, tensor: torch.Tensor, dtype, shape) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != parse_dtype(dtype):
        raise ValueError(f"weight {name!r}: the handle holds {tuple(tensor.shape)} {tensor.dtype}, the call "
                         f"announced {tuple(shape)} {parse_dtype(dtype)}")
    return tensor


def call_worker(worker: Worker, method: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
    """vLLM's collective_rpc on one worker: `method` is a worker method's name, or a function
    called with the worker first."""
    kwargs = kwargs or {}
    if callable(method):
        return method(worker, *args, **kwargs)
    fn = getattr(worker, method, None) if isinstance(method, str) and not method.startswith("_") else None
    if fn is None:
        raise AttributeError(f"collective_rpc: the worker has no method {method!r}")
    return fn(*args, **kwargs)


def make_worker(engine, extension_cls: Any = None) -> Worker:
    """A Worker, with the extension class (or its dotted name) mixed in front as vLLM does."""
    if extension_cls is None:
        return Worker(engine)
    if isinstance(extension_cls, str):
        import importlib
        module, _, name = extension_cls.rpartition(".")
        extension_cls = getattr(importlib.import_module(module), name)
    cls = type(f"{extension_cls.__name__}Worker", (extension_cls, Worker), {})
    return cls(engine)
