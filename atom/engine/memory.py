"""Device memory that can be given back and taken again without moving: what sleep/wake stands on.

The engine keeps two pools, one per tag: "weights" (every parameter) and "kv_cache" (the paged
KV tensors). A pool can `release()` its memory (optionally offloading the contents to host
memory first) and `restore()` it later. Tensors keep their Python identity throughout, so every
module, list and CUDA graph that holds them stays valid:

* `VmmPool` (CUDA, `EngineConfig(enable_sleep_mode=True)`): CUDA virtual memory management
  through the `cuda-python` driver bindings, as vLLM's CuMemAllocator and torch_memory_saver do.
  The pool reserves one virtual address range once (cuMemAddressReserve) and backs it with
  physical segments (cuMemCreate + cuMemMap + cuMemSetAccess). Sleep unmaps and releases the
  physical segments (the memory goes back to the driver: `torch.cuda.mem_get_info` sees it);
  wake creates and maps new ones at the same virtual addresses, so the tensors' data pointers,
  and CUDA graphs captured on them, never change.
* `KvVmmPool`: the KV cache's VmmPool. Each KV tensor starts on an allocation granule, so after
  a wake the pool can map only its first blocks and back the rest as the block manager needs
  them (`EngineConfig.lazy_kv_wake`).
* `TensorPool` (CPU, or any device without sleep mode): releases by pointing each tensor at an
  empty storage (`Tensor.set_()`) and restores by giving it a fresh one; data pointers change,
  which is harmless where nothing was captured.
"""
from __future__ import annotations

import math
import time
from typing import Iterable

import torch

from atom.ops import weights_changed

WEIGHTS, KV_CACHE = "weights", "kv_cache"
TAGS = (WEIGHTS, KV_CACHE)

_ALIGN = 512  # byte alignment of every tensor inside a VMM pool


class TensorPool:
    """Tensors that can be dropped and re-created in place (any device; addresses change)."""

    def __init__(self, tag: str, device: torch.device) -> None:
        self.tag = tag
        self.device = device
        self.tensors: list[torch.Tensor] = []
        self._layout: list[tuple[torch.Size, tuple[int, ...], torch.dtype]] = []
        self._saved: list[torch.Tensor | torch.UntypedStorage] | None = None
        self.released = False

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds when awake."""
        return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for shape, _, dt in self._layout)

    @property
    def resident_bytes(self) -> int:
        """Bytes the pool holds on its device right now."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self._check_awake("allocate in")
        t = torch.zeros(shape, dtype=dtype, device=self.device)
        self._register(t)
        return t

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        """Take existing tensors (e.g. parameters) into the pool, as they are."""
        self._check_awake("adopt into")
        seen = {id(t) for t in self.tensors}
        for t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            if not t.is_contiguous() or t.storage_offset() != 0:
                raise ValueError(f"{self.tag} pool: only whole contiguous tensors can be adopted")
            self._register(t)

    def _register(self, t: torch.Tensor) -> None:
        self.tensors.append(t)
        self._layout.append((t.shape, t.stride(), t.dtype))

    def _check_awake(self, what: str) -> None:
        if self.released:
            raise RuntimeError(f"cannot {what} the {self.tag} pool while it is released")

    @torch.no_grad()
    def release(self, offload: bool = False) -> None:
        if self.released:
            raise RuntimeError(f"the {self.tag} pool is already released")
        saved: list = []
        for t in self.tensors:
            if offload:
                # On the host the storage itself is the offloaded copy; elsewhere copy it out.
                saved.append(t.untyped_storage() if t.device.type == "cpu" else t.detach().to("cpu"))
            t.set_()
        self._saved = saved if offload else None
        self.released = True
        if self.tag == WEIGHTS:
            weights_changed()  # e.g. the CPU backend's packed weight copies go too
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def restore(self, zero: bool = True) -> None:
        """Give every tensor memory again: its offloaded contents if any, else zeros (or garbage)."""
        if not self.released:
            raise RuntimeError(f"the {self.tag} pool is not released")
        for i, (t, (shape, stride, dtype)) in enumerate(zip(self.tensors, self._layout)):
            if self._saved is not None:
                src = self._saved[i]
                if isinstance(src, torch.UntypedStorage):
                    t.set_(src, 0, shape, stride)
                    continue
                fresh = src.to(self.device)
            else:
                fresh = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=self.device)
            t.set_(fresh.untyped_storage(), 0, shape, stride)
        self._saved = None
        self.released = False
        if self.tag == WEIGHTS:
            weights_changed()


# ---- CUDA virtual memory management ------------------------------------------------------------

def vmm_available() -> bool:
    """Whether the cuda-python driver bindings can be imported (they are needed for VmmPool)."""
    try:
        from cuda.bindings import driver  # noqa: F401
        return True
    except ImportError:
        return False


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("sleep mode on CUDA needs the cuda-python driver bindings "
                           "(pip install cuda-bindings)") from e
    return driver


class DeviceOutOfMemory(RuntimeError):
    """The driver had no physical memory for a mapping."""


def _check(result, what: str):
    """cuda-python returns (CUresult, *values): raise on error, return the value(s)."""
    driver = _driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        error = DeviceOutOfMemory if err == driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY else RuntimeError
        raise error(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class _CudaArray:
    """The minimal __cuda_array_interface__ torch.as_tensor needs to wrap raw device memory."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class VmmPool:
    """A fixed virtual address range backed by physical segments that come and go.

    Tensors are carved out of the range front to back (`zeros`, `adopt`); physical segments
    are mapped as the range fills (each at least `segment_bytes`). `release` unmaps and frees
    every segment; `restore` maps new ones at the same addresses.
    """

    def __init__(self, tag: str, device: torch.device, reserve_bytes: int | None = None,
                 segment_bytes: int = 512 << 20) -> None:
        driver = _driver()
        self.tag = tag
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self._driver = driver
        torch.cuda.init()
        with torch.cuda.device(self.device):
            torch.cuda.current_stream().synchronize()  # makes torch's primary context current here
        _check(driver.cuInit(0), "cuInit")
        self._cu_device = _check(driver.cuDeviceGet(self.device.index), "cuDeviceGet")
        prop = driver.CUmemAllocationProp()
        prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device.index
        prop.requestedHandleTypes = driver.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
        self._prop = prop
        access = driver.CUmemAccessDesc()
        access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.device.index
        access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access
        self.granularity = int(_check(driver.cuMemGetAllocationGranularity(
            prop, driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity"))
        if reserve_bytes is None:
            reserve_bytes = torch.cuda.get_device_properties(self.device).total_memory
        self.reserved = _round_up(reserve_bytes, self.granularity)
        self.segment_bytes = _round_up(segment_bytes, self.granularity)
        self.base = int(_check(driver.cuMemAddressReserve(self.reserved, self.granularity, 0, 0),
                               "cuMemAddressReserve"))
        self.used = 0                                   # bytes handed out to tensors
        self.segments: list[tuple[int, int]] = []       # (offset, size) of each physical segment
        self._handles: list = []                        # one per mapped segment; empty when released
        self._host: torch.Tensor | None = None          # pinned host copy for offloaded sleeps
        self._offloaded = False
        self.released = False
        self.tensors: list[torch.Tensor] = []
        # Driver time of mapping, by call. On the H200, cuMemCreate takes ~1.8 ms/GiB and the rest
        # is noise; neither mapping from 8 threads nor 2-64 GiB physical chunks changed that.
        self.map_seconds = {"create": 0.0, "map": 0.0, "access": 0.0}
        self._context = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")

    # ---- size ----------------------------------------------------------------------------
    @property
    def mapped_bytes(self) -> int:
        return sum(size for _, size in self.segments)

    @property
    def nbytes(self) -> int:
        """Physical bytes the pool holds when awake."""
        return self.mapped_bytes

    @property
    def resident_bytes(self) -> int:
        return 0 if self.released else self.mapped_bytes

    # ---- mapping -------------------------------------------------------------------------
    def _map(self, offset: int, size: int):
        d, timer = self._driver, self.map_seconds
        t0 = time.perf_counter()
        handle = _check(d.cuMemCreate(size, self._prop, 0), f"cuMemCreate({size} bytes, {self.tag} pool)")
        t1 = time.perf_counter()
        try:
            _check(d.cuMemMap(self.base + offset, size, 0, handle, 0), "cuMemMap")
        except BaseException:
            d.cuMemRelease(handle)
            raise
        t2 = time.perf_counter()
        _check(d.cuMemSetAccess(self.base + offset, size, [self._access], 1), "cuMemSetAccess")
        timer["create"] += t1 - t0
        timer["map"] += t2 - t1
        timer["access"] += time.perf_counter() - t2
        return handle

    def _unmap(self, offset: int, size: int, handle) -> None:
        _check(self._driver.cuMemUnmap(self.base + offset, size), "cuMemUnmap")
        _check(self._driver.cuMemRelease(handle), "cuMemRelease")

    def _grow(self, end: int) -> None:
        """Map physical segments until [0, end) is backed."""
        mapped = self.mapped_bytes
        if end <= mapped:
            return
        if end > self.reserved:
            raise RuntimeError(f"{self.tag} pool: {end} bytes exceed the reserved {self.reserved}")
        size = min(max(_round_up(end - mapped, self.granularity), self.segment_bytes), self.reserved - mapped)
        self._handles.append(self._map(mapped, size))
        self.segments.append((mapped, size))

    def _view(self, offset: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over [offset, offset + nbytes) of the range (which must be mapped)."""
        return torch.as_tensor(_CudaArray(self.base + offset, nbytes), device=self.device)

    def _carve(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.released:
            raise RuntimeError(f"cannot allocate in the {self.tag} pool while it is released")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        offset = _round_up(self.used, _ALIGN)
        self._grow(offset + max(nbytes, 1))
        self.used = offset + nbytes
        return self._view(offset, max(nbytes, 1))[:nbytes].view(dtype).view(shape)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = self._carve(tuple(shape), dtype)
        t.zero_()
        self.tensors.append(t)
        return t

    @torch.no_grad()
    def adopt(self, tensors: Iterable[torch.Tensor], empty_cache_every: int = 1 << 30) -> None:
        """Move existing tensors (parameters) into the pool in place: `t.data` becomes pool memory.

        The originals are freed as we go (and handed back to the driver every ~1 GiB), so the
        peak is about one model's weights, not two.
        """
        seen = {id(t) for t in self.tensors}
        freed = 0
        for t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            new = self._carve(tuple(t.shape), t.dtype)
            new.copy_(t.data)
            freed += t.untyped_storage().nbytes()
            t.data = new
            self.tensors.append(t)
            if freed >= empty_cache_every:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
                freed = 0
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    # ---- sleep / wake --------------------------------------------------------------------
    @torch.no_grad()
    def release(self, offload: bool = False) -> None:
        if self.released:
            raise RuntimeError(f"the {self.tag} pool is already released")
        torch.cuda.synchronize(self.device)
        size = self.mapped_bytes
        if offload and size:
            if self._host is None or self._host.numel() < size:
                self._host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._host[:size].copy_(self._view(0, size), non_blocking=True)
            torch.cuda.synchronize(self.device)
        self._offloaded = offload
        for (offset, seg), handle in zip(self.segments, self._handles):
            self._unmap(offset, seg, handle)
        self._handles = []
        self.released = True
        torch.cuda.empty_cache()  # activations cached by torch go back too

    @torch.no_grad()
    def restore(self, zero: bool = True) -> None:
        if not self.released:
            raise RuntimeError(f"the {self.tag} pool is not released")
        self._handles = self._map_all()
        self.released = False
        size = self.mapped_bytes
        if size and self._offloaded:
            self._view(0, size).copy_(self._host[:size], non_blocking=True)
        elif size and zero:
            self._view(0, size).zero_()
        self._offloaded = False
        torch.cuda.synchronize(self.device)

    def _map_all(self) -> list:
        """Map every segment again; all or nothing."""
        handles = []
        try:
            for offset, size in self.segments:
                handles.append(self._map(offset, size))
        except BaseException:
            for (offset, size), handle in zip(self.segments, handles):
                self._unmap(offset, size, handle)
            raise
        return handles

    def drop_host_copy(self) -> None:
        """Free the pinned host buffer kept for offloaded sleeps (it is reused from cycle to cycle)."""
        if self._offloaded:
            raise RuntimeError(f"the {self.tag} pool's contents live in the host copy right now")
        self._host = None

    def close(self) -> None:
        """Unmap everything and give the address range back (the pool's tensors become invalid)."""
        if not self.released:
            torch.cuda.synchronize(self.device)
            for (offset, seg), handle in zip(self.segments, self._handles):
                self._unmap(offset, seg, handle)
        self._handles, self.segments = [], []
        if self.base:
            _check(self._driver.cuMemAddressFree(self.base, self.reserved), "cuMemAddressFree")
            self.base = 0
        self.released = True


class KvVmmPool(VmmPool):
    """The KV cache in virtual memory, with physical memory behind a leading range of blocks.

    Every KV tensor ([num_blocks, ...], one block count for all) starts on an allocation granule,
    so blocks [0, n) of all tensors can be backed without the rest. At start-up the whole pool is
    mapped (the engine sized it from free memory and holds it). After a sleep, `restore(blocks=k)`
    maps only the first k blocks and `back(n)` maps more, a chunk of the pool at a time, as the
    block manager hands out higher block ids: waking costs what the next rollouts use, not the
    whole pool (mapping runs at ~1.8 ms/GiB on an H200: 0.12 s for a 67 GiB pool).
    """

    chunks = 16  # a wake maps 1/chunks of the pool; each later step at least doubles what is backed

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.offsets: list[int] = []   # where each KV tensor starts in the range
        self.span = 0                  # bytes of each tensor, rounded up to the granularity
        self.block_bytes = 0           # bytes of one block in one tensor
        self.num_blocks = 0
        self.backed_bytes = 0          # leading bytes of every tensor that have memory behind them

    @property
    def nbytes(self) -> int:
        """Physical bytes of the whole pool (all blocks backed)."""
        return self.span * len(self.offsets)

    @property
    def backed_blocks(self) -> int:
        return 0 if self.released or not self.block_bytes else min(self.num_blocks, self.backed_bytes // self.block_bytes)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.released:
            raise RuntimeError("cannot allocate in the kv_cache pool while it is released")
        shape = tuple(shape)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not self.offsets:
            self.num_blocks, self.block_bytes = shape[0], nbytes // max(shape[0], 1)
            self.span = self.backed_bytes = _round_up(max(nbytes, 1), self.granularity)
        elif shape[0] != self.num_blocks or nbytes != self.num_blocks * self.block_bytes:
            raise ValueError(f"kv_cache pool: every tensor needs {self.num_blocks} blocks of {self.block_bytes} "
                             f"bytes, got shape {shape} ({nbytes} bytes)")
        offset = _round_up(self.used, self.granularity)
        if offset + self.span > self.reserved:
            raise RuntimeError(f"kv_cache pool: {offset + self.span} bytes exceed the reserved {self.reserved}")
        self._handles.append(self._map(offset, self.span))
        self.segments.append((offset, self.span))
        self.offsets.append(offset)
        self.used = offset + self.span
        t = self._view(offset, self.span)[:nbytes].view(dtype).view(shape)
        t.zero_()
        self.tensors.append(t)
        return t

    def adopt(self, tensors: Iterable[torch.Tensor], empty_cache_every: int = 1 << 30) -> None:
        raise TypeError("the kv_cache pool only holds the KV tensors it allocated (zeros)")

    @torch.no_grad()
    def release(self, offload: bool = False) -> None:
        if offload:
            raise ValueError("the KV cache is never offloaded (its contents are recomputed)")
        super().release()
        self.segments, self.backed_bytes = [], 0

    @torch.no_grad()
    def restore(self, zero: bool = True, blocks: int | None = None) -> None:
        """Map the first `blocks` blocks of every tensor again (None: all), zeroed if asked."""
        if not self.released:
            raise RuntimeError("the kv_cache pool is not released")
        self.released = False
        try:
            self.back(self.num_blocks if blocks is None else max(blocks, 1), zero)
        except BaseException:
            self.release()
            raise
        torch.cuda.synchronize(self.device)

    def back(self, blocks: int, zero: bool = False, budget: int | None = None) -> int:
        """Give blocks [0, blocks) of every tensor physical memory; returns the blocks backed.

        Maps generously (see below) when the device has room, else just the granules asked
        for, and never more than `budget` new bytes (fewer blocks then). Raises
        DeviceOutOfMemory when the driver has not even those (nothing changed then).
        """
        if self.released:
            raise RuntimeError("cannot back blocks of the kv_cache pool while it is released")
        want = min(blocks, self.num_blocks) * self.block_bytes
        if want <= self.backed_bytes:
            return self.backed_blocks
        exact = min(self.span, _round_up(want, self.granularity))
        # Whole chunks, and at least double what is backed: a tensor ends up in at most
        # log2(chunks) + 1 segments, so sleep (which unmaps segment by segment) stays quick.
        chunk = _round_up(-(-self.span // self.chunks), self.granularity)
        ample = min(self.span, max(_round_up(want, chunk), 2 * self.backed_bytes))
        if budget is not None:
            cap = self.backed_bytes + max(budget, 0) // len(self.offsets) // self.granularity * self.granularity
            exact, ample = min(exact, cap), min(ample, cap)
        if exact <= self.backed_bytes:
            return self.backed_blocks
        try:
            self._back_to(ample, zero)
        except DeviceOutOfMemory:
            if ample == exact:
                raise
            self._back_to(exact, zero)
        return self.backed_blocks

    def _back_to(self, end: int, zero: bool) -> None:
        start, new = self.backed_bytes, []
        try:
            for offset in self.offsets:
                new.append((offset + start, end - start, self._map(offset + start, end - start)))
        except BaseException:
            for offset, size, handle in new:
                self._unmap(offset, size, handle)
            raise
        for offset, size, handle in new:
            self.segments.append((offset, size))
            self._handles.append(handle)
            if zero:
                self._view(offset, size).zero_()
        self.backed_bytes = end


class EngineMemory:
    """The engine's two pools ("weights", "kv_cache") and which of them are asleep."""

    def __init__(self, device: torch.device, sleep_mode: bool) -> None:
        self.device = device
        self.vmm = device.type == "cuda" and sleep_mode
        self.sleep_capable = device.type != "cuda" or self.vmm
        if self.vmm:
            total = torch.cuda.get_device_properties(device).total_memory
            self.pools = {WEIGHTS: VmmPool(WEIGHTS, device, reserve_bytes=total),
                          KV_CACHE: KvVmmPool(KV_CACHE, device, reserve_bytes=total)}
        else:
            self.pools = {tag: TensorPool(tag, device) for tag in TAGS}
        self.kv_num_blocks = 0
        self._kv_zero = False
        # Device memory that backing KV blocks on demand leaves free: room for a step's activations
        # (the runner sets it from its measured warm-up step).
        self.keep_free = 1 << 30

    def adopt_weights(self, model: torch.nn.Module) -> None:
        self.pools[WEIGHTS].adopt(p for p in model.parameters())

    def kv_zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.kv_num_blocks = shape[0]
        return self.pools[KV_CACHE].zeros(shape, dtype)

    @property
    def kv_on_demand(self) -> bool:
        """Whether KV blocks can be backed a range at a time (VMM), not only all at once."""
        return isinstance(self.pools[KV_CACHE], KvVmmPool)

    def wake_kv(self, zero: bool, blocks: int | None = None) -> int:
        """Restore the KV pool: all of it, or (on demand) its first `blocks` blocks; returns how
        many blocks have memory behind them."""
        pool = self.pools[KV_CACHE]
        self._kv_zero = zero
        if not self.kv_on_demand:
            pool.restore(zero=zero)
            return self.kv_num_blocks
        pool.restore(zero=zero, blocks=blocks)
        return pool.backed_blocks

    def back_kv(self, blocks: int) -> int:
        """Back KV blocks [0, blocks) if the device has the memory; returns the blocks backed
        (fewer when it does not: the scheduler then works with what there is)."""
        pool = self.pools[KV_CACHE]
        budget = torch.cuda.mem_get_info(self.device)[0] - self.keep_free
        try:
            return pool.back(blocks, zero=self._kv_zero, budget=budget)
        except DeviceOutOfMemory:
            return pool.backed_blocks

    def asleep(self) -> set[str]:
        return {tag for tag, pool in self.pools.items() if pool.released}

    def nbytes(self, tag: str) -> int:
        return self.pools[tag].nbytes

    def resident_bytes(self, tag: str | None = None) -> int:
        tags = TAGS if tag is None else (tag,)
        return sum(self.pools[t].resident_bytes for t in tags)
