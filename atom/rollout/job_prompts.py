"""A rollout job's prompt file (JSONL or Parquet), read row by row and only as far as the job needs."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from atom.rollout.job_errors import JobError

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "data" / "default_prompts.jsonl"
_PARQUET_BATCH_ROWS = 1024


@dataclass
class Prompt:
    index: int
    prompt: Any  # str | list[int] | list[dict]
    hash: str
    where: str   # "file:line" or "file: row N", for error messages


def prompt_hash(prompt: Any) -> str:
    canon = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _is_token_ids(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value))


def _prompt_of(row: Any, data, where: str) -> Any:
    if not isinstance(row, dict):
        raise JobError(f"{where}: expected a JSON object, got {type(row).__name__}")
    keys = [k for k in (data.messages_key, data.prompt_key, data.token_ids_key) if k]
    if data.messages_key and row.get(data.messages_key) is not None:
        msgs = row[data.messages_key]
        ok = (isinstance(msgs, list) and len(msgs) > 0 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs))
        if not ok:
            raise JobError(f"{where}: {data.messages_key!r} must be a non-empty list of "
                           f"{{\"role\": str, \"content\": str}} messages")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if data.prompt_key and row.get(data.prompt_key) is not None:
        value = row[data.prompt_key]
        if isinstance(value, str) and value:
            return value
        if _is_token_ids(value):
            return [int(t) for t in value]
        raise JobError(f"{where}: {data.prompt_key!r} must be a non-empty string or a list of token ids")
    if data.token_ids_key and row.get(data.token_ids_key) is not None:
        value = row[data.token_ids_key]
        if _is_token_ids(value):
            return [int(t) for t in value]
        raise JobError(f"{where}: {data.token_ids_key!r} must be a non-empty list of token ids (ints >= 0)")
    if not keys:
        raise JobError("data: set at least one of data.messages_key, data.prompt_key, data.token_ids_key")
    raise JobError(f"{where}: no prompt: none of the keys {keys} (data.messages_key / data.prompt_key / "
                   f"data.token_ids_key)")


def _format_of(path: Path, fmt: str) -> str:
    if fmt in ("jsonl", "parquet"):
        return fmt
    if fmt != "auto":
        raise JobError(f"data.format must be auto, jsonl or parquet, got {fmt!r}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise JobError(f"data.path {str(path)!r}: cannot tell the format from {suffix or 'no extension'!r}; "
                   f"set data.format=jsonl or data.format=parquet")


def prompt_file(data) -> Path:
    """The prompt file, checked to exist, with the data settings that shape reading it."""
    path = Path(data.path).expanduser() if data.path else DEFAULT_PROMPTS
    if not path.exists():
        raise JobError(f"data.path {str(path)!r}: no such file")
    if not path.is_file():
        raise JobError(f"data.path {str(path)!r}: not a file")
    if data.batch_size < 1:
        raise JobError(f"data.batch_size must be >= 1, got {data.batch_size}")
    if data.limit is not None and data.limit < 1:
        raise JobError(f"data.limit must be >= 1 or null, got {data.limit}")
    return path


def _jsonl_rows(path: Path) -> Iterator[tuple[Any, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            # Decoded line by line so that bad bytes are reported with their line; a BOM (files saved
            # by some Windows editors) is not part of the first prompt.
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise JobError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise JobError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            yield row, f"{path}:{lineno}"


def _parquet_rows(path: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS)
        rowno = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield row, f"{path}: row {rowno}"
                rowno += 1
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise JobError(f"data.path {str(path)!r}: cannot read as Parquet ({e})") from None


def load_prompts(data, count: int | None = None) -> list[Prompt]:
    """The first `count` prompts of the file (None: all), validated; JobError on the first bad row.

    Rows after the first `count` are not read: a job with data.limit costs what it uses, whatever
    the size of the file.
    """
    path = prompt_file(data)
    rows = _jsonl_rows(path) if _format_of(path, data.format) == "jsonl" else _parquet_rows(path)
    prompts: list[Prompt] = []
    try:
        for row, where in islice(rows, count):
            p = _prompt_of(row, data, where)
            prompts.append(Prompt(len(prompts), p, prompt_hash(p), where))
    finally:
        rows.close()  # the file, now rather than when the generator is collected
    if not prompts:
        raise JobError(f"data.path {str(path)!r}: no prompts (empty file)")
    return prompts
