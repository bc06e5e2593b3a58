"""File helpers shared by checkpoints, datasets and trained networks: checksums, all-or-nothing directory
writes, and summaries that vouch for the weights beside them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_summary(directory: str | Path, weights: str) -> dict[str, Any] | None:
    """directory/summary.json if the file `weights` beside it is the one its `weights_sha256` names, else None."""
    summary_file, weights_file = Path(directory) / "summary.json", Path(directory) / weights
    if not (summary_file.is_file() and weights_file.is_file()):
        return None
    summary = json.loads(summary_file.read_text())
    return summary if summary.get("weights_sha256") == sha256_file(weights_file) else None


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill. If the block succeeds, the sibling replaces `path`
    whole (an old one is moved aside first, then removed); if it fails, the sibling is removed and
    `path` is left as it was. No reader ever sees a half-written directory under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
