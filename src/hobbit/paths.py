"""Where hobbit keeps what it builds: `$HOBBIT_CACHE`, else `$XDG_CACHE_HOME/hobbit`, else ~/.cache/hobbit."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "HOBBIT_CACHE"


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "hobbit"
