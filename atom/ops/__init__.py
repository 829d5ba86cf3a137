"""Kernel routing: `ops.NAME(...)` calls the backend chosen for this engine's device."""
from atom.ops.registry import OpTable, implementations, register, weights_changed

ops = OpTable()

__all__ = ["ops", "register", "implementations", "OpTable", "weights_changed"]
