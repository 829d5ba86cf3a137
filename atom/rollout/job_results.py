"""A rollout job's results file: where the job may write, what it already holds, and its lines.

The job never writes over a file it did not create. `output.path` may name a new file, or a
results file of a job with the same settings (same `config_hash`: model and sampling): with
output.resume the job appends after the prompts already there (cutting off a torn last line a
crash left), without it the job starts that file anew. Anything else (the prompt file itself,
any other file, results of other settings) is refused before the engine is even built.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atom.rollout.job_errors import JobError
from atom.rollout.job_prompts import Prompt

# Every result line starts so (json.dumps of a dict whose first key is "index"): a torn last line
# is a prefix of one; a file that starts otherwise is no results file.
RESULT_PREFIX = b'{"index": '
_PEEK_BYTES = 1 << 16


@dataclass
class ResultsFile:
    """An output path and what an earlier run of this job left there."""

    path: Path
    exists: bool = False
    done: dict[int, tuple[str, int]] = field(default_factory=dict)  # prompt index -> (prompt hash, line)
    good_end: int = 0  # bytes of intact lines: a torn last line starts here
    stamp: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) when scanned: see changed()

    @property
    def torn(self) -> bool:
        """Whether the file ends in a torn line (bytes past the last intact line)."""
        return self.stamp is not None and self.stamp[1] > self.good_end

    def changed(self) -> bool:
        """Whether the file was created, written or replaced since it was scanned (another job)."""
        return _stamp(self.path) != self.stamp

    @property
    def max_index(self) -> int:
        return max(self.done, default=-1)

    def done_for(self, prompts: list[Prompt]) -> set[int]:
        """The indices already done, each checked against the prompt file (JobError if one differs)."""
        for idx, (hash_, lineno) in sorted(self.done.items()):
            if idx >= len(prompts) or prompts[idx].hash != hash_:
                raise JobError(f"{self.path}:{lineno}: result for prompt {idx} does not match the prompt file; "
                               "use another output.path")
        return set(self.done)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _is_torn(line: bytes) -> bool:
    """A last line without its newline that a crash may have cut anywhere, even inside its first bytes."""
    return not line.endswith(b"\n") and (line.startswith(RESULT_PREFIX) or RESULT_PREFIX.startswith(line))


def _check_path(out: Path) -> None:
    """Refuse, before any work, an output.path the job could not write: a folder, a dangling link,
    a read-only file."""
    if out.is_symlink() and not out.exists():
        raise JobError(f"output.path {str(out)!r} is a symbolic link to nothing ({os.readlink(out)!r}); "
                       "choose another output.path")
    if out.exists() and not out.is_file():
        raise JobError(f"output.path {str(out)!r}: not a file" + (" (a folder: name a file inside it, e.g. "
                       f"output.path={str(out / 'rollouts.jsonl')})" if out.is_dir() else ""))
    if out.exists() and not os.access(out, os.W_OK):
        raise JobError(f"output.path {str(out)!r}: not writable")


def _not_ours(path: Path, where: str) -> JobError:
    return JobError(f"{where}: not a rollout result line; output.path {str(path)!r} must be a new file or a "
                    "results file of this job (the job never writes over other files): choose another output.path")


def _result_of(line: bytes) -> dict | None:
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = (isinstance(rec, dict) and isinstance(rec.get("index"), int) and not isinstance(rec["index"], bool)
          and rec["index"] >= 0 and isinstance(rec.get("prompt_hash"), str))
    return rec if ok else None


def scan_results(out: Path, data_path: Path, cfg_hash: str) -> ResultsFile:
    """What `out` holds; JobError unless the job may write there (see the module docstring)."""
    _check_path(out)
    if not out.exists():
        return ResultsFile(out)
    if os.path.samefile(out, data_path):
        raise JobError(f"output.path {str(out)!r} is the prompt file (data.path): the job never writes over its input")
    results = ResultsFile(out, exists=True, stamp=_stamp(out))
    with open(out, "rb") as f:
        head = f.read(_PEEK_BYTES).lstrip()
        if head and not (head.startswith(RESULT_PREFIX) or RESULT_PREFIX.startswith(head)):
            raise _not_ours(out, f"{out}:1")  # refused unread, however large the file
        f.seek(0)
        pos = 0
        for lineno, line in enumerate(f, 1):
            pos += len(line)
            terminated = line.endswith(b"\n")
            if not line.strip():
                results.good_end = pos if terminated else results.good_end
                continue
            rec = _result_of(line) if terminated else None
            if rec is None:
                if _is_torn(line):
                    break  # a torn last line (a crash mid-write): cut off before appending
                raise _not_ours(out, f"{out}:{lineno}")
            if rec.get("config_hash") != cfg_hash:
                raise JobError(f"{out}:{lineno}: written by a job with another model or sampling settings; "
                               "use another output.path (the job never writes over other results)")
            results.done[rec["index"]] = (rec["prompt_hash"], lineno)
            results.good_end = pos
    return results


def open_results(results: ResultsFile, resume: bool):
    """The results file, open for writing: a new file, appended to after its intact lines
    (resume), or started anew (an earlier results file of this job, without resume)."""
    out = results.path
    out.parent.mkdir(parents=True, exist_ok=True)
    if not results.exists:
        try:
            return open(out, "xb")
        except FileExistsError:
            raise JobError(f"output.path {str(out)!r}: the file appeared while the job ran; not overwritten") from None
    if not resume:
        return open(out, "wb")
    f = open(out, "r+b")
    f.truncate(results.good_end)  # cut a torn last line off
    f.seek(results.good_end)
    return f


def repair_tail(results: ResultsFile) -> None:
    """Cut off a torn last line (a crash mid-write) when nothing is left to append after it."""
    if results.exists and results.torn:
        with open_results(results, resume=True) as f:  # opening to append cuts it
            os.fsync(f.fileno())


def record(p: Prompt, out, want_top: bool, cfg_hash: str) -> dict[str, Any]:
    """One result line (a dict whose first key is "index": see RESULT_PREFIX)."""
    completions = []
    for c in out.outputs:
        d = {"index": c.index, "text": c.text, "token_ids": list(c.token_ids), "logprobs": list(c.logprobs),
             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason, "weight_version": c.weight_version}
        if want_top:
            d["top_logprobs"] = [{str(t): lp for t, lp in top.items()} for top in c.top_logprobs]
        if c.routed_experts is not None:  # [positions, moe_layers, top_k]
            d["routed_experts"] = c.routed_experts.tolist()
        completions.append(d)
    rec = {"index": p.index, "prompt_hash": p.hash, "config_hash": cfg_hash, "prompt": p.prompt,
           "prompt_token_ids": list(out.prompt_token_ids), "completions": completions}
    if out.prompt_logprobs is not None:
        rec["prompt_logprobs"] = [None if e is None else {str(t): lp for t, lp in e.items()}
                                  for e in out.prompt_logprobs]
    return rec
