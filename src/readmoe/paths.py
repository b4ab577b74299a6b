"""Where readmoe keeps what it derives once and reuses (converted models, downloads)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "READMOE_CACHE"


def cache_dir() -> Path:
    """The cache root: $READMOE_CACHE, else ~/.cache/readmoe."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "readmoe"
    path.mkdir(parents=True, exist_ok=True)
    return path
