"""Triton JIT compiles inside a timed region, so a benchmark can say whether its number paid for
compiles (session 9: the first grpo-mla-moe run of a fresh device process took 26.75 s after a
14.6 s warm-up, the next one 23.63 s after 2.2 s; the suspicion is kernels compiled inside the
timed run, which a warm on-disk cache makes cheap). Counts in-process cache misses: a compile,
or a load from triton's on-disk cache."""
from __future__ import annotations

import time
from collections import Counter


MAX_SHOWN, MAX_CHARS = 12, 600


def _describe(fn, compile: dict) -> str:
    """'kernel warps=W stages=S {constexpr: value}' from the arguments of triton's hook (its
    `compile` dict keys the constants by parameter index tuples; names from the JIT function)."""
    params = getattr(getattr(fn, "jit_function", None), "params", None) or []
    names = [getattr(p, "name", str(p)) for p in params]
    consts = {}
    for k, v in (compile.get("constants") or {}).items():
        i = k[0] if isinstance(k, tuple) and len(k) == 1 else k
        consts[names[i] if isinstance(i, int) and i < len(names) else str(k)] = v
    return f"{fn.name} warps={compile.get('num_warps')} stages={compile.get('num_stages')} {consts}"


class CompileWatch:
    """Context manager: while active, every Triton JIT cache miss is counted by kernel name with
    the seconds it took. Without triton (CPU machines), it counts nothing."""

    def __init__(self) -> None:
        self.kernels: Counter[str] = Counter()
        self.specializations: list[str] = []  # triton's description of the first MAX_SHOWN compiles
        self.seconds = 0.0
        self._started: dict[str, float] = {}
        self._saved = None

    def _before(self, *, key, fn, **_) -> None:
        self._started[f"{fn.name}:{key}"] = time.perf_counter()
        return None  # a true value would tell triton to skip the compile

    def _after(self, *, key, fn, compile=None, **_) -> None:  # noqa: A002 (triton's keyword)
        t0 = self._started.pop(f"{fn.name}:{key}", None)
        if t0 is not None:
            self.seconds += time.perf_counter() - t0
        self.kernels[fn.name] += 1
        if len(self.specializations) < MAX_SHOWN:
            # Which variant the warm-up missed, not only which kernel.
            self.specializations.append(_describe(fn, compile or {})[:MAX_CHARS])
        return None

    def __enter__(self) -> "CompileWatch":
        try:
            from triton import knobs
        except ImportError:
            return self
        rt = knobs.runtime
        self._saved = (rt.jit_cache_hook, rt.jit_post_compile_hook)
        rt.jit_cache_hook, rt.jit_post_compile_hook = self._before, self._after
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            from triton import knobs
            knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._saved
            self._saved = None

    def summary(self) -> dict:
        return {"count": sum(self.kernels.values()), "seconds": round(self.seconds, 3),
                "kernels": dict(self.kernels.most_common()), "specializations": list(self.specializations)}
