"""HF tensor names -> slices of our (fused, stacked) parameters, and loading into them.

`WeightMap` is built once per model: a dict from every accepted HF name to the slot it fills,
so each incoming tensor is placed in O(1) whatever the checkpoint's size.

Under tensor / expert parallelism (atom.distributed) a slot also says which part of the full HF
tensor this rank keeps (`shard`), and a slot whose tensor only other ranks hold has no `param`:
callers always pass full HF tensors and each rank narrows them (`copy_into`), or reads only
its slices from safetensors (`load_checkpoint`).
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from collections.abc import ItemsView
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from atom.models.layers.linear import Linear
from atom.models.layers.mlp import FusedExpertTensor, SparseMoE

# Tensors some checkpoints and trainer state_dicts carry that are derived, not learned (RoPE
# tables; ColossalAI-trained checkpoints carry the cos/sin caches too): skipped, as vLLM skips them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


# One narrowing of a full HF tensor: (dim, start, length, parts). parts > 1: the dim stacks
# `parts` equal blocks (gate|up) and each block is narrowed to [start, start + length).
Narrow = tuple[int, int, int, int]


@dataclass(frozen=True)
class WeightSlot:
    """Where one HF tensor lands: param[expert][row_offset : row_offset + rows] (None = whole).

    Sharded (tensor / expert parallelism): `shard` narrows the full HF tensor, of shape
    `full_shape`, to this rank's part; `param` is None when other ranks hold all of it.
    """

    param: nn.Parameter | None
    expert: int | None = None
    row_offset: int = 0
    rows: int | None = None
    shard: tuple[Narrow, ...] = ()
    full_shape: tuple[int, ...] | None = None
    # HF layout -> ours, applied to the full tensor before `shard` (GPT-OSS's transposed experts).
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None

    def target(self) -> torch.Tensor | None:
        """This rank's destination (None: not held here).

        The view is built once and kept while the parameter's storage stays where it is (a MoE
        update touches ~19k slots, and building views costs more than copying the bytes).
        """
        if self.param is None:
            return None
        ptr = self.param.data_ptr()
        cached = self.__dict__.get("_view")
        if cached is not None and cached[0] == ptr:
            return cached[1]
        t = self.param.data if self.expert is None else self.param.data[self.expert]
        t = t if self.rows is None else t.narrow(0, self.row_offset, self.rows)
        object.__setattr__(self, "_view", (ptr, t))  # a cache, not state: frozen otherwise
        return t

    def forget_view(self) -> None:
        self.__dict__.pop("_view", None)

    def shape(self) -> tuple[int, ...]:
        """Shape of the (full) HF tensor this slot accepts."""
        if self.full_shape is not None:
            return self.full_shape
        target = self.target()
        return tuple(target.shape) if target is not None else ()

    def select(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full HF tensor."""
        if self.convert is not None:
            tensor = self.convert(tensor)
        for dim, start, length, parts in self.shard:
            if parts == 1:
                tensor = tensor.narrow(dim, start, length)
            else:
                tensor = tensor.unflatten(dim, (parts, -1)).narrow(dim + 1, start, length).flatten(dim, dim + 1)
        return tensor

    def read(self, safetensors_slice) -> torch.Tensor:
        """This rank's part straight from a safetensors `get_slice` handle (reads only that part)."""
        if self.convert is not None or any(parts > 1 for *_, parts in self.shard):
            return self.select(safetensors_slice[:])
        index = [slice(None)] * len(self.shape())
        for dim, start, length, _ in self.shard:
            index[dim] = slice(start, start + length)
        return safetensors_slice[tuple(index)]


def _sharded(param: nn.Parameter | None, full_shape: tuple[int, ...], shard: tuple[Narrow, ...],
             expert: int | None = None, row_offset: int = 0, rows: int | None = None) -> WeightSlot:
    shard = tuple(n for n in shard if not (n[1] == 0 and n[2] * n[3] == full_shape[n[0]]))  # drop no-ops
    if not shard and param is not None:
        return WeightSlot(param, expert, row_offset, rows)
    return WeightSlot(param, expert, row_offset, rows, shard, tuple(full_shape))


def _tp_slot(module: nn.Module, pname: str, p: nn.Parameter, row_offset: int = 0,
             rows: int | None = None, fused: str = "") -> WeightSlot:
    """The slot of a parameter (or fused rows of it) that tensor parallelism may split on one dim."""
    dim = getattr(module, "tp_shard_dims", {}).get(pname)
    if dim is None or module.tp_size == 1:
        return WeightSlot(p, None, row_offset, rows)
    replicas = getattr(module, "tp_replicas", {}).get(fused, 1)  # ranks holding one block (replicated KV heads)
    local = list(p.shape)
    if rows is not None:
        local[0] = rows
    full = list(local)
    full[dim] = full[dim] * module.tp_size // replicas
    start = (module.tp_rank // replicas) * local[dim]
    return _sharded(p, tuple(full), ((dim, start, local[dim], 1),), None, row_offset, rows)


class WeightMap:
    def __init__(self, model: nn.Module) -> None:
        self.slots: dict[str, WeightSlot] = {}
        # Names accepted besides the checkpoint's own, and the checkpoint names each one fills.
        self.alternatives: dict[str, WeightSlot] = {}
        self.fills: dict[str, list[str]] = {}
        # A tied LM head is the embedding's Parameter: the HF checkpoint may or may not repeat it.
        self.optional: set[str] = set()
        seen: dict[int, str] = {}
        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, Linear):
                for pname in ("weight", "bias"):
                    p = getattr(module, pname)
                    if p is None:
                        continue
                    if id(p) in seen:
                        self.optional.add(f"{prefix}{pname}")
                        self.slots[f"{prefix}{pname}"] = self.slots[seen[id(p)]]
                        continue
                    if len(module.shard_sizes) == 1:
                        self._add(f"{prefix}{pname}", _tp_slot(module, pname, p))
                    else:
                        parent = prefix.rsplit(".", 2)[0] + "."
                        shards = [f"{parent}{shard}.{pname}" for shard in module.shard_sizes]
                        for shard, name in zip(module.shard_sizes, shards):
                            off, rows = module.shard_offset(shard)
                            self._add(name, _tp_slot(module, pname, p, off, rows, shard))
                        self._add_fused_name(f"{prefix}{pname}", module, p, shards)
                    seen[id(p)] = f"{prefix}{pname}"
            elif isinstance(module, SparseMoE):
                fused = module.fused_tensors() if hasattr(module, "fused_tensors") else None
                held = {"w13", "w2"} if fused is None else self._add_fused(prefix, module, fused)
                if fused is None:
                    self._add_experts(prefix, module)
                for pname, p in module.named_parameters(recurse=False):  # replicated extras (routing bias)
                    if pname not in held:
                        self._add(f"{prefix}{pname}", WeightSlot(p))
            else:
                for pname, p in module.named_parameters(recurse=False):
                    name = f"{prefix}{pname}"
                    if id(p) in seen:  # tied embedding/lm_head
                        self.optional.add(name)
                        self.slots[name] = self.slots[seen[id(p)]]
                        continue
                    seen[id(p)] = name
                    self._add(name, _tp_slot(module, pname, p))
        self._rename(getattr(model, "checkpoint_renames", ()))
        # Names a complete update may leave out (DeepSeek's e_score_correction_bias, an HF buffer).
        for pattern in getattr(model, "optional_weights", ()):
            self.optional.update(n for n in self.slots if re.search(pattern, n))
        # Checkpoint tensors a family does not load (DeepSeek's multi-token-prediction layers).
        skips = model.checkpoint_skips() if hasattr(model, "checkpoint_skips") else ()
        self.skip = re.compile("|".join(f"(?:{s})" for s in skips)) if skips else None

    def _rename(self, renames: tuple[tuple[str, str], ...]) -> None:
        """A family whose checkpoint names differ from our module tree's (Mixtral's
        block_sparse_moe.experts.E.w1): its names become the required ones, ours stay accepted."""
        if not renames:
            return

        def rename(name: str) -> str:
            for pattern, repl in renames:
                name = re.sub(pattern, repl, name)
            return name

        for name in list(self.slots):
            new = rename(name)
            if new != name:
                slot = self.slots.pop(name)
                self.slots[new] = slot
                self.alternatives[name] = slot
                self.fills[name] = [new]
                if name in self.optional:
                    self.optional.discard(name)
                    self.optional.add(new)
        for name, filled in self.fills.items():
            self.fills[name] = [rename(n) for n in filled]

    def skipped(self, name: str) -> bool:
        """Whether a checkpoint tensor is deliberately not loaded (derived, or a part we do not run)."""
        return is_ignored(name) or (self.skip is not None and self.skip.match(name) is not None)

    def _add(self, name: str, slot: WeightSlot) -> None:
        self.slots[name] = slot

    def _add_fused_name(self, name: str, module: nn.Module, p: nn.Parameter, shards: list[str]) -> None:
        """Accept a fused parameter under its own name too (`...qkv_proj.weight` = q|k|v rows,
        `...gate_up_proj.weight` = gate|up): vLLM's load_weights takes its fused names as well,
        and they are this engine's own parameter names. Unsharded engines only: a full fused
        tensor cannot be split per rank without its shards' sizes."""
        if getattr(module, "tp_size", 1) != 1 or name in self.slots:
            return
        self.alternatives[name] = WeightSlot(p)
        self.fills[name] = list(shards)

    def _add_experts(self, prefix: str, moe: SparseMoE) -> None:
        inter, num_experts = moe.intermediate_size, moe.num_experts
        if moe.w13.shape[0] == num_experts and moe.tp_size == 1:
            for e in range(num_experts):
                base = f"{prefix}experts.{e}."
                self._add(f"{base}gate_proj.weight", WeightSlot(moe.w13, e, 0, inter))
                self._add(f"{base}up_proj.weight", WeightSlot(moe.w13, e, inter, inter))
                self._add(f"{base}down_proj.weight", WeightSlot(moe.w2, e))
            gate_up_slot, down_slot = WeightSlot(moe.w13), WeightSlot(moe.w2)
        else:
            gate_up_slot, down_slot = self._add_expert_shards(prefix, moe)
        # transformers >= 5 keeps experts fused in memory: accept that layout too (weight updates
        # from a trainer holding a v5 model arrive this way).
        gate_up, down = f"{prefix}experts.gate_up_proj", f"{prefix}experts.down_proj"
        self.alternatives[gate_up] = gate_up_slot
        self.alternatives[down] = down_slot
        self.fills[gate_up] = [f"{prefix}experts.{e}.{p}_proj.weight" for e in range(num_experts) for p in ("gate", "up")]
        self.fills[down] = [f"{prefix}experts.{e}.down_proj.weight" for e in range(num_experts)]

    def _add_expert_shards(self, prefix: str, moe: SparseMoE) -> tuple[WeightSlot, WeightSlot]:
        """Expert parallelism: experts [expert_start, +local) live here, each with intermediate rows
        [tp_rank*I, (tp_rank+1)*I) of the full moe_intermediate_size; other experts are accepted
        and dropped."""
        local, inter, hidden = moe.w13.shape[0], moe.intermediate_size, moe.w13.shape[2]
        full_inter, start = inter * moe.tp_size, moe.expert_start
        rows = ((0, moe.tp_rank * inter, inter, 1),)
        cols = ((1, moe.tp_rank * inter, inter, 1),)
        for e in range(moe.num_experts):
            base, el = f"{prefix}experts.{e}.", e - start
            mine = 0 <= el < local
            w13, w2, el = (moe.w13, moe.w2, el) if mine else (None, None, None)
            self._add(f"{base}gate_proj.weight", _sharded(w13, (full_inter, hidden), rows, el, 0, inter))
            self._add(f"{base}up_proj.weight", _sharded(w13, (full_inter, hidden), rows, el, inter, inter))
            self._add(f"{base}down_proj.weight", _sharded(w2, (hidden, full_inter), cols, el))
        experts = (0, start, local, 1)
        gate_up = _sharded(moe.w13, (moe.num_experts, 2 * full_inter, hidden),
                           (experts, (1, moe.tp_rank * inter, inter, 2)))
        down = _sharded(moe.w2, (moe.num_experts, hidden, full_inter), (experts, (2, moe.tp_rank * inter, inter, 1)))
        return gate_up, down

    def _add_fused(self, prefix: str, moe: SparseMoE, tensors: list[FusedExpertTensor]) -> set[str]:
        """A checkpoint with every expert in one tensor (GPT-OSS); returns the parameters filled."""
        for t in tensors:
            p = getattr(moe, t.param)
            shard: list[Narrow] = []
            if p.shape[0] != moe.num_experts:
                shard.append((0, moe.expert_start, p.shape[0], 1))
            if moe.tp_size > 1 and t.inter_dim is not None:
                inter = moe.intermediate_size
                shard.append((t.inter_dim, moe.tp_rank * inter, inter, t.parts))
            self._add(f"{prefix}{t.name}", WeightSlot(p, shard=tuple(shard), full_shape=t.hf_shape, convert=t.convert))
        return {t.param for t in tensors}

    def lookup(self, name: str) -> WeightSlot | None:
        slot = self.slots.get(name)
        return slot if slot is not None else self.alternatives.get(name)

    def forget_views(self) -> None:
        """Drop the cached destination views (they would keep released storage alive)."""
        for slot in (*self.slots.values(), *self.alternatives.values()):
            slot.forget_view()

    def required_names(self) -> set[str]:
        return set(self.slots) - self.optional

    def unpushed_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's tensors of the optional names that no required name shares a parameter
        with (an HF buffer, such as DeepSeek's e_score_correction_bias, which trainers'
        named_parameters() leave out; not a tied LM head, which is the embedding's)."""
        required = {id(self.slots[n].param) for n in self.required_names()}
        out = {}
        for name in sorted(self.optional):
            slot = self.slots.get(name)
            if slot is not None and slot.param is not None and id(slot.param) not in required:
                out[name] = slot.target()
        return out

    def covered_by(self, name: str) -> list[str]:
        """Checkpoint names one accepted name fills (a fused expert tensor fills all experts)."""
        return self.fills.get(name, [name])


def is_ignored(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES)


class CopyBatch:
    """Copies between tensors of one device and dtype, issued together as one multi-tensor copy:
    a MoE checkpoint has ~19k small per-expert tensors, and one launch each costs more than the
    bytes. The sources must stay unchanged until `flush` (load_weights flushes before returning)."""

    def __init__(self, max_tensors: int = 512, max_bytes: int = 1 << 29) -> None:
        self.max_tensors, self.max_bytes = max_tensors, max_bytes
        self.dst: list[torch.Tensor] = []
        self.src: list[torch.Tensor] = []
        self.nbytes = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        device, dtype = dst.device, dst.dtype
        if src.device != device or src.dtype != dtype:
            dst.copy_(src, non_blocking=True)  # a cast or a transfer: its own copy
            return
        if self.dst and (self.key[0] != device or self.key[1] != dtype):
            self.flush()
        self.key = (device, dtype)
        self.dst.append(dst)
        self.src.append(src)
        self.nbytes += src.numel() * src.element_size()
        if len(self.dst) >= self.max_tensors or self.nbytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if self.dst:
            torch._foreach_copy_(self.dst, self.src, non_blocking=True)
        self.dst, self.src, self.nbytes = [], [], 0


def check_pair(item, index: int) -> tuple[str, torch.Tensor]:
    """Item `index` of an update as (name, tensor); TypeError naming it when it is anything else."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        what = f"a {type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list)) else \
            type(item).__name__
        raise TypeError(f"weight update item {index}: expected a (name, tensor) pair, got {what}")
    name, tensor = item
    if not isinstance(name, str):
        raise TypeError(f"weight update item {index}: the name must be a str, got {type(name).__name__} "
                        f"{name!r:.60}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"weight {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
    return name, tensor


class UpdateCheck:
    """Follows one update (or checkpoint load) name by name: each name must be a parameter of the
    model, have its shape, and fill checkpoint tensors no earlier name of the same update filled
    (a repeated name, or per-expert and fused expert tensors for the same expert, would otherwise
    let the last copy win silently). Raises ValueError naming the tensor."""

    def __init__(self, weight_map: WeightMap, model_name: str) -> None:
        self.weight_map = weight_map
        self.model_name = model_name
        self.filled: dict[str, str] = {}  # checkpoint name filled so far -> the name that filled it

    def accept(self, name: str, shape: tuple[int, ...]) -> WeightSlot | None:
        """The slot `name` goes to (None: a derived tensor, or one the family does not load)."""
        if self.weight_map.skipped(name):
            return None
        slot = self.weight_map.lookup(name)
        if slot is None:
            raise ValueError(f"weight {name!r} is not a parameter of this {self.model_name}")
        expected = tuple(slot.shape())
        if tuple(shape) != expected:
            raise ValueError(f"weight {name!r}: shape {tuple(shape)} does not match the model's {expected}")
        covers = self.weight_map.covered_by(name)
        again = next((c for c in covers if c in self.filled), None)
        if again is not None:
            earlier = self.filled[again]
            if earlier == name:
                raise ValueError(f"weight {name!r} appears twice in one update")
            raise ValueError(f"weight {name!r} fills {again!r}, which {earlier!r} of this update already filled")
        self.filled.update(dict.fromkeys(covers, name))
        return slot

    def missing(self) -> list[str]:
        return sorted(self.weight_map.required_names() - self.filled.keys())


def check_tensor(name: str, tensor: torch.Tensor, check_finite: bool = False) -> None:
    """ValueError unless `tensor` holds floating data (and, with check_finite, only finite values)."""
    if tensor.is_meta:
        raise ValueError(f"weight {name!r} is a meta tensor (a shape without data); materialize it first")
    if not tensor.is_floating_point():
        raise ValueError(f"weight {name!r}: expected a floating tensor, got {tensor.dtype}")
    # Checked in full on every rank, so that all ranks of a sharded engine accept or refuse alike.
    if check_finite and not torch.isfinite(tensor).all():
        raise ValueError(f"weight {name!r}: contains non-finite values (nan or inf)")


def copy_into(slot: WeightSlot, tensor: torch.Tensor, batch: CopyBatch | None = None) -> None:
    """Copy one checked full HF tensor into this rank's part of its slot (now, or queued in `batch`)."""
    target = slot.target()
    if target is None:  # held by other ranks only
        return
    if slot.shard or slot.convert is not None:
        tensor = slot.select(tensor)
    if batch is None:
        target.copy_(tensor, non_blocking=True)
    else:
        batch.copy(target, tensor)


def _inside(model_dir: str, name) -> str:
    """model_dir/name, refused unless it names a file inside model_dir. Checked on the path as
    written, without following links: checkpoints in the HF cache are links into its blob store."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise ValueError(f"{model_dir}: checkpoint file {name!r} in the index is not a relative path")
    root = os.path.normpath(model_dir)
    path = os.path.normpath(os.path.join(root, name))
    if os.path.dirname(path) != root and not path.startswith(root + os.sep):
        raise ValueError(f"{model_dir}: checkpoint file {name!r} in the index lies outside the checkpoint "
                         "directory")
    return path


def checkpoint_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files: those its index names (each inside model_dir), else *.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{index}: not a safetensors index (no 'weight_map')") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to file names")
        return sorted({_inside(model_dir, f) for f in weight_map.values()})
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir!r}")
    return files


def iter_checkpoint(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a safetensors checkpoint, one tensor in memory at a time."""
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class LoadProgress:
    """What a `load_weights` call has placed so far (kept when it raises half-way)."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()  # checkpoint names filled
        self.count = 0                 # tensors accepted (copied, or queued and flushed)


def load_weights(model: nn.Module, weight_map: WeightMap, tensors: Iterable[tuple[str, torch.Tensor]],
                 check_finite: bool = False, require_all: bool = True, progress: LoadProgress | None = None) -> int:
    """Place every tensor; a malformed pair raises TypeError, an unknown name, a bad shape or dtype, a
    name filled twice and (if require_all) missing tensors raise ValueError naming the tensor.

    A list, tuple or dict view is checked whole before the first copy, so a bad tensor anywhere in
    it changes nothing; other iterables stream (one tensor in memory at a time) and are checked as
    they come. Returns the number of tensors loaded; `progress` (if given) follows along, errors included.
    """
    progress = progress if progress is not None else LoadProgress()
    if isinstance(tensors, (list, tuple, ItemsView)):
        tensors = list(tensors)
        dry = UpdateCheck(weight_map, type(model).__name__)
        for i, item in enumerate(tensors):
            name, tensor = check_pair(item, i)
            if dry.accept(name, tuple(tensor.shape)) is not None:
                check_tensor(name, tensor, check_finite)
        if require_all:
            _check_complete(dry.missing())
        check_finite = False  # done
    check = UpdateCheck(weight_map, type(model).__name__)
    batch = CopyBatch()
    try:
        for i, item in enumerate(tensors):
            name, tensor = check_pair(item, i)
            slot = check.accept(name, tuple(tensor.shape))
            if slot is None:
                continue
            check_tensor(name, tensor, check_finite)
            copy_into(slot, tensor, batch)
            progress.loaded.update(weight_map.covered_by(name))
            progress.count += 1
    finally:
        batch.flush()  # what was accepted before an error lands too, as with one copy per tensor
    if require_all:
        _check_complete(check.missing())
    return progress.count


def _check_complete(missing: list[str]) -> None:
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")


def load_checkpoint(model: nn.Module, weight_map: WeightMap, model_dir: str) -> int:
    """`load_weights(model, weight_map, iter_checkpoint(model_dir))` for sharded models: each rank
    reads only the slices it keeps (safetensors get_slice) and skips tensors it does not hold."""
    check = UpdateCheck(weight_map, type(model).__name__)
    count = 0
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                slot = check.accept(name, tuple(part.get_shape()))
                if slot is None:
                    continue
                dtype = part.get_dtype()
                if not dtype.startswith(("F", "BF")):
                    raise ValueError(f"weight {name!r}: expected a floating tensor, got {dtype}")
                target = slot.target()
                if target is not None:
                    target.copy_(slot.read(part), non_blocking=True)
                count += 1
    _check_complete(check.missing())
    return count
