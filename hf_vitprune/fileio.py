"""Writing directories so that a failed save leaves nothing half-written; reading saved JSON strictly.

Imports only the standard library: it is copied next to saved models with modeling.py.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: a staging directory's owner is known only within its own process
    fcntl = None

# Weight files a new save replaces wholesale: stale shards of an older save must not survive it.
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
# Moved into place last (its old version removed first): a commit cut short leaves nothing from_pretrained loads.
_LAST = "config.json"
_HEX_PARTIAL = r"\.[0-9a-f]{16}\.partial"
# Staging directories this process is writing into (all of them, where flock is unavailable).
_LIVE: set[str] = set()


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory to write into; move its files into ``path`` only on success.

    A new directory appears by one rename of a staging sibling, made with ``os.mkdir``'s mode
    (0o777 less the umask, as stock ``save_pretrained``). An existing one (a Trainer output
    directory holding checkpoints, or a Docker volume or tmpfs mount point) is staged inside
    itself, since a rename across filesystems fails (EXDEV). It keeps its other entries; each
    written file replaces its old version by an atomic rename, and weight shards of an earlier
    save that the new one does not write are removed. On any error the staging directory is
    deleted and ``path`` is left as it was. While written, the staging directory holds an exclusive
    ``flock`` (gone with a killed process), and staging that earlier saves to ``path`` left and no
    live save holds is deleted first (docs/failures.md).
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"Cannot save into {target}: it is a file. Pass a directory path (new or existing).")
    existed = target.is_dir()
    if not existed:
        target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = _new_staging_directory(target if existed else target.parent, target.name)
    lock = lock_staging(staging)
    _LIVE.add(os.path.abspath(staging))
    try:
        yield staging
        if existed or target.exists():
            _move_entries(staging, target)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _LIVE.discard(os.path.abspath(staging))
        if lock is not None:
            os.close(lock)


def staging_path(parent: Path, name: str) -> Path:
    """A fresh ``.NAME.<16 hex>.partial`` path in ``parent``: where a save (or an export) of ``name`` stages."""
    return parent / f".{name}.{secrets.token_hex(8)}.partial"


def _new_staging_directory(parent: Path, name: str) -> Path:
    """An empty staging directory in ``parent``; ``mkdir`` (unlike mkdtemp's 0700) honours the umask."""
    staging = staging_path(parent, name)
    staging.mkdir()
    return staging


def lock_staging(staging: Path) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on ``staging`` (a directory or a file), which marks it as in
    use until the descriptor closes, including when the process is killed; None where the platform or filesystem
    has no flock."""
    if fcntl is None:
        return None
    try:
        descriptor = os.open(staging, os.O_RDONLY)
    except OSError:  # a umask that leaves the owner no read permission
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


def is_stale_staging(staging: Path) -> bool:
    """Whether ``staging`` (a directory or a file) belongs to no save in progress: not one of this process's and,
    where flock works, not locked by any other process (a killed process's lock is gone with it). Without flock,
    any staging this process is not writing is taken as stale."""
    if os.path.abspath(staging) in _LIVE:
        return False
    if fcntl is None:
        return True
    try:
        descriptor = os.open(staging, os.O_RDONLY)
    except OSError:  # removed meanwhile, or unreadable: leave it alone
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        return error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # held: a live save
    finally:
        os.close(descriptor)
    return True


def stale_staging_entries(path: str | os.PathLike) -> list[Path]:
    """The staging directories (``.NAME.<16 hex>.partial``) that a killed save into ``path`` left, beside it or
    inside it, and that no save in progress owns."""
    target = Path(path)
    pattern = re.compile(rf"^\.{re.escape(target.name)}{_HEX_PARTIAL}$")
    found = []
    for folder in (target.parent, target):
        try:
            entries = list(folder.iterdir()) if folder.is_dir() else []
        except OSError:  # a parent the save may write into but not list: nothing to tidy there
            continue
        for entry in entries:
            if pattern.match(entry.name) and entry.is_dir() and not entry.is_symlink() and is_stale_staging(entry):
                found.append(entry)
    return found


def remove_stale_staging(path: str | os.PathLike) -> list[Path]:
    """Delete what :func:`stale_staging_entries` finds for ``path``; returns the deleted paths."""
    stale = stale_staging_entries(path)
    for entry in stale:
        shutil.rmtree(entry, ignore_errors=True)
    return stale


def check_writable(path: str | os.PathLike, name: str = "the output directory") -> None:
    """Fail now, not after hours of training, when a save into ``path`` could not even start: ``path`` (or the
    nearest existing directory above it, where the save would create it) must accept a new entry. Tried with the
    staging directory a save makes (and removed at once), so a read-only mount or missing permission shows, even
    where ``os.access`` would not tell."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{name} {target} is a file. Pass a directory path (new or existing).")
    existing = target.absolute()
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent
    try:
        _new_staging_directory(existing, target.name).rmdir()
    except OSError as error:
        where = str(target) if existing == target.absolute() else f"{existing} (where {target} would be created)"
        raise PermissionError(
            f"Cannot write to {name} {where}: {error.strerror or error}, so the model could not be saved there; "
            f"nothing was started. Make it writable (e.g. chmod u+w {existing}) or choose another output directory."
        ) from None


def describe_entries(path: str | os.PathLike, limit: int = 5) -> str:
    """What ``path`` holds, for an error message: up to ``limit`` names (folders with a slash), then a count."""
    names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in Path(path).iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _move_entries(staging: Path, target: Path) -> None:
    """Move every entry of ``staging`` into ``target``, replacing same-named ones and stale weight shards.

    config.json goes last and its old version first, so a commit cut short leaves a directory that
    ``from_pretrained`` refuses rather than one that mixes two saves."""
    written = {entry.name for entry in staging.iterdir()}
    if _LAST in written and (target / _LAST).is_file():
        (target / _LAST).unlink()
    if any(_WEIGHT_FILE.match(name) for name in written):
        for old in target.iterdir():
            if _WEIGHT_FILE.match(old.name) and old.name not in written and old.is_file():
                old.unlink()
    for entry in sorted(staging.iterdir(), key=lambda entry: entry.name == _LAST):
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
