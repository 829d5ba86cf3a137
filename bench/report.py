"""How every benchmark reports: one `RESULT {json}` line on stdout (gpu_check.sh greps it) and,
with --json FILE, the same object appended as one line."""
from __future__ import annotations

import json


def emit(result: dict, json_path: str | None) -> None:
    print("RESULT " + json.dumps(result))
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(result) + "\n")
