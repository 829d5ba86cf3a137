"""`python -m atom.rollout [overrides]` / `atom-rollout [overrides]`: a Hydra-configured rollout job.

Configs live in the repo's configs/ (root: configs/rollout.yaml; schema: atom/rollout/job_config.py).
Examples:
    python -m atom.rollout                                     # default model on the default prompts
    python -m atom.rollout sampling=grpo data.path=prompts.jsonl output.path=out.jsonl
    python -m atom.rollout --multirun sampling.temperature=0.6,1.0
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from atom.rollout.job_config import register_configs

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")

register_configs()


def _task(cfg: DictConfig) -> None:
    from atom.rollout.job import JobError, run

    try:
        run(cfg)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted (results written so far are kept; rerun to resume)", file=sys.stderr)
        sys.exit(130)


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="rollout")(_task)

if __name__ == "__main__":
    main()
