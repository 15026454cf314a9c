"""Models shipped inside the package, addressed as ``builtin:NAME`` (e.g. ``vlmjax.load("builtin:llava-shapes")``).

Each is an HF checkpoint directory (config, safetensors, tokenizer and processor files) next to this module, so HF
can read it too: ``LlavaProcessor.from_pretrained(builtin_path("llava-shapes"))``.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlmjax.errors import VlmJaxError

PREFIX = "builtin:"
_ROOT = Path(__file__).parent


def available() -> list[str]:
    """Names of the shipped models."""
    return sorted(p.name for p in _ROOT.iterdir() if (p / "config.json").is_file())


def builtin_path(name: str) -> Path:
    """The directory of the shipped model ``name``."""
    path = _ROOT / name
    if not (path / "config.json").is_file():
        raise VlmJaxError(f"No built-in model {name!r}; the built-in models are: {', '.join(available()) or 'none'}.")
    return path


def resolve(path: str | os.PathLike) -> str | os.PathLike:
    """``builtin:NAME`` -> the shipped model's directory; any other path unchanged."""
    if isinstance(path, str) and path.startswith(PREFIX):
        return builtin_path(path[len(PREFIX):])
    return path
