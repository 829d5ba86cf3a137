"""atom: rollouts for RL training of LLMs."""
from atom.config import EngineConfig
from atom.outputs import Completion, EngineStats, RolloutOutput
from atom.rollout.engine import RolloutEngine
from atom.sampling_params import SamplingParams

__all__ = ["RolloutEngine", "EngineConfig", "SamplingParams", "RolloutOutput", "Completion", "EngineStats"]
