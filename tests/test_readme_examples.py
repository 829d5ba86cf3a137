"""README.md's Python examples run as written on the default model (CPU), or say why not.

Every ```python block carries a marker on the line before it:
  <!-- example: run -->                 run as written (all of them in one fresh process, in order);
  <!-- example: run-pair (...) -->      this block and the next run at the same time, as two
                                        processes (the weight-sync trainer and engine; the port is
                                        swapped for a free one);
  <!-- example: no-run (why; what to substitute) -->.
The output example of the rollout job must show the hashes the job writes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- example: (run|run-pair|no-run)(?: \((.+)\))? -->$")


def readme_blocks() -> list[tuple[str, str, str, int]]:
    """(kind, note, code, line) of every python block."""
    lines = (REPO / "README.md").read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line != "```python":
            continue
        end = lines.index("```", i + 1)
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        m = MARKER.match(prev)
        assert m, f"README.md:{i + 1}: a python block without an example marker (see {__file__})"
        blocks.append((m.group(1), m.group(2) or "", "\n".join(lines[i + 1:end]) + "\n", i + 1))
    return blocks


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_every_block_is_marked_and_the_unrun_ones_say_why():
    blocks = readme_blocks()
    assert sum(k == "run" for k, *_ in blocks) >= 4
    for kind, note, _, line in blocks:
        if kind == "no-run":
            assert len(note) > 20, f"README.md:{line}: say why it does not run and what to substitute"
    pairs = [i for i, (k, *_) in enumerate(blocks) if k == "run-pair"]
    assert len(pairs) % 2 == 0 and all(pairs[i] + 1 == pairs[i + 1] for i in range(0, len(pairs), 2))


def test_runnable_examples_run(smollm2_path, tmp_path):
    runnable = [(code, line) for kind, _, code, line in readme_blocks() if kind == "run"]
    script = ["import runpy, sys, traceback"]
    for code, line in runnable:
        script.append(f"print('== README.md:{line}', flush=True)")
        script.append(f"exec(compile({code!r}, 'README.md:{line}', 'exec'), {{'__name__': '__main__'}})")
    (tmp_path / "examples.py").write_text("\n".join(script) + "\n")
    proc = subprocess.run([sys.executable, "examples.py"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("== README.md:") == len(runnable)


def test_weight_sync_pair_runs(smollm2_path, tmp_path):
    from test_weights_sync import _free_port
    blocks = readme_blocks()
    i = next(i for i, (k, *_) in enumerate(blocks) if k == "run-pair")
    port = str(_free_port())
    procs = []
    for name, (_, _, code, _) in zip(("trainer", "engine"), blocks[i:i + 2]):
        assert "29600" in code
        (tmp_path / f"{name}.py").write_text(code.replace("29600", port))
        procs.append(subprocess.Popen([sys.executable, f"{name}.py"], cwd=tmp_path, env=_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    assert "the engines serve version 1" in outs[0][0] and "serving version 1" in outs[1][0]


def test_the_job_output_example_shows_the_hashes_the_job_writes():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import atom.rollout.job_config  # noqa: F401
    from atom.rollout.job import config_hash, prompt_hash
    text = (REPO / "README.md").read_text()
    shown = re.search(r'\{"index": 0, "prompt_hash": "(\w+)", "config_hash": "(\w+)",\n "prompt": (.+),\n', text)
    assert shown, "the README's output example moved: update this test"
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        job = OmegaConf.to_object(compose("rollout", overrides=["sampling=greedy"]))
    first = json.loads((REPO / "atom" / "rollout" / "data" / "default_prompts.jsonl").read_text().splitlines()[0])
    assert json.loads(shown.group(3)) == first["messages"]
    assert shown.group(1) == prompt_hash(first["messages"])
    assert shown.group(2) == config_hash(job), "run `python -m atom.rollout sampling=greedy` and update the README"


@pytest.mark.parametrize("path", ["examples/vllm_compat.py", "examples/trl_grpo.py", "examples/grpo_colocated.py"])
def test_examples_the_readme_names_exist(path):
    assert (REPO / path).is_file() and path in (REPO / "README.md").read_text()
