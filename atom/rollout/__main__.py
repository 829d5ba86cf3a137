"""`python -m atom.rollout [overrides]` / `atom-rollout [overrides]`: a Hydra-configured rollout job.

Configs live in the repo's configs/ (root: configs/rollout.yaml; schema: atom/rollout/job_config.py).
Examples:
    python -m atom.rollout                                     # default model on the default prompts
    python -m atom.rollout sampling=grpo data.path=prompts.jsonl output.path=out.jsonl
    python -m atom.rollout --multirun sampling.temperature=0.6,1.0
"""
from __future__ import annotations

import contextlib
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
        _drop_empty_run_dir()
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted (results written so far are kept; rerun to resume)", file=sys.stderr)
        _drop_empty_run_dir()
        sys.exit(130)


def _drop_empty_run_dir() -> None:
    """A job that wrote nothing leaves no folder: Hydra's own files (.hydra/, the job log) go, then
    the run folder, and the folders above it up to the working directory, each only if empty."""
    from hydra.core.hydra_config import HydraConfig

    try:
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir).resolve()
    except ValueError:  # not under Hydra (run() called directly)
        return
    cwd = Path.cwd().resolve()
    if run_dir == cwd or run_dir in cwd.parents:
        return
    hydra_dir = run_dir / ".hydra"
    if hydra_dir.is_dir():
        for f in hydra_dir.iterdir():
            if f.suffix == ".yaml":
                f.unlink()
        with contextlib.suppress(OSError):
            hydra_dir.rmdir()
    log = run_dir / f"{hc.job.name}.log"
    if log.is_file():
        log.unlink()
    below_cwd = cwd in run_dir.parents
    for d in [run_dir, *run_dir.parents] if below_cwd else [run_dir]:
        if d == cwd:
            return
        try:
            d.rmdir()  # only when empty
        except OSError:
            return


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="rollout")(_task)

if __name__ == "__main__":
    main()
