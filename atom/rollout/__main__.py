"""`python -m atom.rollout [overrides]` / `atom-rollout [overrides]`: a Hydra-configured rollout job.

Configs live in the repo's configs/ (root: configs/rollout.yaml; schema: atom/rollout/job_config.py).
Examples:
    python -m atom.rollout                                     # default model on the default prompts
    python -m atom.rollout sampling=grpo data.path=prompts.jsonl output.path=out.jsonl
    python -m atom.rollout --multirun sampling.temperature=0.6,1.0
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

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


_hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="rollout")(_task)


def hydra_error_line(e: BaseException) -> str:
    """Hydra's multi-line message for a bad override or config option, as one line naming the key."""
    cause = e.__cause__
    key = getattr(cause, "full_key", None)
    if key and isinstance(cause, OmegaConfBaseException):  # e.g. Key 'temprature' not in 'SamplingConfig'
        return f"{key}: {str(cause).splitlines()[0]}"
    text = str(e).split("\nConfig search path")[0].strip()  # where Hydra looked: noise for a typo
    text = re.sub(r":\s*\n\s*", ": ", text)  # "Available options in 'model':\n\tqwen3_8b\n..."
    line = "; ".join(part.strip() for part in text.splitlines() if part.strip())
    override = getattr(e, "override", None)  # OverrideParseException: the override Hydra could not parse
    return f"{override}: {line}" if override else line


def main() -> None:
    """The CLI: Hydra, but a bad override is one `error: ...` line (exit 1), like any bad input."""
    # Hydra prints its own multi-line report and the HYDRA_FULL_ERROR hint unless told to raise;
    # a user who set HYDRA_FULL_ERROR themselves still gets the full trace.
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except HydraException as e:
        if full_error:
            raise
        print(f"error: {hydra_error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
