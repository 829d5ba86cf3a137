"""atom: rollouts for RL training of LLMs."""
from atom.config import EngineConfig
from atom.outputs import Completion, EngineStats, RolloutOutput
from atom.rollout.async_engine import AsyncRolloutEngine, EngineDeadError
from atom.rollout.engine import RolloutEngine
from atom.sampling_params import SamplingParams

__all__ = ["RolloutEngine", "AsyncRolloutEngine", "EngineDeadError", "EngineConfig", "SamplingParams", "RolloutOutput", "Completion", "EngineStats"]
