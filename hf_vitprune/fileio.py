"""Writing directories so that a failed save leaves nothing half-written; reading saved JSON strictly.

Imports only the standard library: it is copied next to saved models with modeling.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Weight files a new save replaces wholesale: stale shards of an older save must not survive it.
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory to write into; move its files into ``path`` only on success.

    A new directory appears by one rename of a staging sibling, made with ``os.mkdir``'s mode
    (0o777 less the umask, as stock ``save_pretrained``). An existing one (a Trainer output
    directory holding checkpoints, or a Docker volume or tmpfs mount point) is staged inside
    itself, since a rename across filesystems fails (EXDEV). It keeps its other entries; each
    written file replaces its old version by an atomic rename, and weight shards of an earlier
    save that the new one does not write are removed. On any error the staging directory is
    deleted and ``path`` is left as it was.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"Cannot save into {target}: it is a file. Pass a directory path (new or existing).")
    existed = target.is_dir()
    if not existed:
        target.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_staging_directory(target if existed else target.parent, target.name)
    try:
        yield staging
        if existed or target.exists():
            _move_entries(staging, target)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _new_staging_directory(parent: Path, name: str) -> Path:
    """An empty ``.NAME.*.partial`` directory in ``parent``; ``mkdir`` (unlike mkdtemp's 0700) honours the umask."""
    staging = parent / f".{name}.{secrets.token_hex(8)}.partial"
    staging.mkdir()
    return staging


def _move_entries(staging: Path, target: Path) -> None:
    """Move every entry of ``staging`` into ``target``, replacing same-named ones and stale weight shards."""
    written = {entry.name for entry in staging.iterdir()}
    if any(_WEIGHT_FILE.match(name) for name in written):
        for old in target.iterdir():
            if _WEIGHT_FILE.match(old.name) and old.name not in written and old.is_file():
                old.unlink()
    for entry in staging.iterdir():
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        elif entry.is_dir() and (destination.exists() or destination.is_symlink()):
            destination.unlink()  # a file where a directory goes: os.replace cannot swap the kinds
        os.replace(entry, destination)


def reject_unknown_fields(cls: type, data: dict) -> None:
    """A saved JSON whose keys are not all fields of dataclass ``cls`` is an error, not silently dropped."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} fields {unknown}; valid fields are {sorted(known)}.")


def read_json_object(path: Path, fix: str) -> dict:
    """The JSON object in ``path``. A corrupt, truncated or non-object file raises a ValueError naming the
    file and ``fix`` (json's own error names neither)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the file is corrupt or truncated. {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a JSON object. {fix}")
    return data
