"""Writing directories so that a failed save leaves nothing half-written; reading saved JSON strictly.

Imports only the standard library: it is copied next to saved models with modeling.py.
"""

from __future__ import annotations

import os
import re
import shutil
import dataclasses
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Weight files a new save replaces wholesale: stale shards of an older save must not survive it.
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; move its files into ``path`` only on success.

    A new directory appears by one rename. An existing one (a Trainer output directory holding
    checkpoints, say) keeps its other entries; each written file replaces its old version by an
    atomic rename, and weight shards of an earlier save that the new one does not write are removed.
    On any error the temporary directory is deleted and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not target.exists():
        os.replace(staging, target)
        return
    written = {entry.name for entry in staging.iterdir()}
    if any(_WEIGHT_FILE.match(name) for name in written):
        for old in target.iterdir():
            if _WEIGHT_FILE.match(old.name) and old.name not in written and old.is_file():
                old.unlink()
    for entry in staging.iterdir():
        destination = target / entry.name
        if destination.is_dir() and not entry.is_dir():
            shutil.rmtree(destination)
        if entry.is_dir() and destination.exists():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    staging.rmdir()


def reject_unknown_fields(cls: type, data: dict) -> None:
    """A saved JSON whose keys are not all fields of dataclass ``cls`` is an error, not silently dropped."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} fields {unknown}; valid fields are {sorted(known)}.")
