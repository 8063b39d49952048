"""The pruning state a checkpoint carries, so that ``resume_from_checkpoint`` continues exactly.

A checkpoint is complete when it holds the model weights, Trainer's ``trainer_state.json`` and both
pruning-state files (:func:`missing_files` lists what one lacks): a job killed while saving leaves a
checkpoint that ``resume_from_checkpoint=True`` skips. The state also records the run's
``PruningConfig`` (its ``to_dict()``), so that a resume with another config is refused
(:func:`config_differences`) instead of mixing two runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .fileio import atomic_directory
from .plan import PruningPlan

STATE_JSON = "pruning_state.json"
STATE_TENSORS = "pruning_state.safetensors"
TRAINER_STATE = "trainer_state.json"  # what Trainer writes last into a checkpoint
FINETUNE = "finetune"  # the phase after compaction; the search phase is named by the method
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")  # Trainer's checkpoint folder names
# Model weights as Trainer saves them: one file, or an index of shards (safetensors or torch), or a
# folder of FSDP shards / a DeepSpeed step folder.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FOLDERS = re.compile(r"^(pytorch_model_fsdp_\d+|global_step\d+)$")


@dataclass
class PruningState:
    """Phase, the method's state tensors, the plan and the run's config; JSON plus safetensors, no pickles.

    ``config`` is the run's ``PruningConfig.to_dict()``; None for checkpoints written before it was stored.
    """

    phase: str = FINETUNE
    plan: PruningPlan | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict | None = None

    def save(self, directory: str | os.PathLike) -> None:
        meta = {"phase": self.phase, "plan": self.plan.to_dict() if self.plan is not None else None}
        if self.config is not None:
            meta["config"] = self.config
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors.items()}
        with atomic_directory(directory) as staging:
            save_file(tensors, str(staging / STATE_TENSORS))
            (staging / STATE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PruningState:
        directory = Path(directory)
        path = directory / STATE_JSON
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory} holds no {STATE_JSON}: it is not a PruningTrainer checkpoint (or its save was "
                f"interrupted). Resume from a checkpoint-N folder that a PruningTrainer wrote, or pass "
                f"resume_from_checkpoint=True to pick the newest complete one."
            )
        tensors_path = directory / STATE_TENSORS
        if not tensors_path.is_file():
            raise FileNotFoundError(
                f"{tensors_path} is missing: the checkpoint {directory} is incomplete (its save was interrupted, or "
                f"the file was removed), and the method's state cannot be restored without it. Resume from an "
                f"earlier checkpoint, or pass resume_from_checkpoint=True to pick the newest complete one."
            )
        meta = json.loads(path.read_text())
        phase = meta.get("phase")
        if not (isinstance(phase, str) and phase.isidentifier()):
            raise ValueError(f"{path} has phase {phase!r}; expected {FINETUNE!r} or the name of a method's search phase.")
        plan = PruningPlan.from_dict(meta["plan"]) if meta.get("plan") else None
        config = meta.get("config")
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"{path} has config {config!r}; expected a PruningConfig.to_dict() object.")
        return cls(phase, plan, load_file(str(tensors_path)), config)


def missing_files(directory: str | os.PathLike) -> list[str]:
    """What a complete PruningTrainer checkpoint holds and ``directory`` lacks (empty when complete).

    Complete means: the model weights (a weights file, or an index together with every shard it
    names, or FSDP / DeepSpeed weight folders), ``trainer_state.json``, ``pruning_state.json`` and
    ``pruning_state.safetensors``.
    """
    directory = Path(directory)
    missing = []
    weights = _missing_weights(directory)
    if weights:
        missing.append(weights)
    missing += [name for name in (TRAINER_STATE, STATE_JSON, STATE_TENSORS) if not (directory / name).is_file()]
    return missing


def _missing_weights(directory: Path) -> str | None:
    if any((directory / name).is_file() for name in _WEIGHT_FILES):
        return None
    for index in _WEIGHT_INDEXES:
        if (directory / index).is_file():
            try:
                shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                return f"readable {index}"
            absent = [shard for shard in shards if not (directory / shard).is_file()]
            return f"weight shards {', '.join(absent)}" if absent else None
    if directory.is_dir() and any(_WEIGHT_FOLDERS.match(entry.name) and entry.is_dir() for entry in directory.iterdir()):
        return None
    return "the model weights (model.safetensors)"


def checkpoints_newest_first(folder: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders in ``folder``, highest N first (none if ``folder`` does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), entry) for entry in folder.iterdir()
             if entry.is_dir() and (match := CHECKPOINT_PATTERN.match(entry.name))]
    return [entry for _, entry in sorted(found, key=lambda item: item[0], reverse=True)]


def resume_checkpoint(resume_from_checkpoint: str | os.PathLike | bool | None, output_dir: str | os.PathLike,
                      search_phase: str, *, required: bool = True, narrate=None) -> str | None:
    """The checkpoint a run resumes from, for ``PruningTrainer.train`` and ``hf-vitprune prune`` alike.

    A path must be a complete checkpoint. ``True`` picks the newest complete one under ``output_dir``, the
    fine-tuning folder first, then ``search_phase``'s; incomplete ones (a save that was killed) are
    skipped and told to ``narrate(message, *args, level=...)``. When none is complete: a ``ValueError``
    with ``required``, else None (the caller starts from the beginning).
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint is not True:
        checkpoint = str(resume_from_checkpoint)
        missing = missing_files(checkpoint)
        if STATE_JSON in missing or STATE_TENSORS in missing:
            PruningState.load(checkpoint)  # raises, naming the missing pruning-state file
        if missing:
            raise FileNotFoundError(
                f"Cannot resume from {checkpoint}: it lacks {', '.join(missing)}, so it is incomplete (its save "
                f"was interrupted, or files were removed). Resume from an earlier checkpoint, or pass "
                f"resume_from_checkpoint=True to pick the newest complete one."
            )
        return checkpoint
    narrate = narrate or (lambda message, *args, level=logging.INFO: None)
    folders = [os.path.join(output_dir, phase) for phase in (FINETUNE, search_phase)]
    skipped = []
    for folder in folders:
        for candidate in checkpoints_newest_first(folder):
            missing = missing_files(candidate)
            if not missing:
                if skipped:
                    narrate("Resuming from %s, the newest complete checkpoint.", candidate)
                return str(candidate)
            skipped.append(f"{candidate} (lacks {', '.join(missing)})")
            narrate("Skipping checkpoint %s: it lacks %s (its save was interrupted?).", candidate,
                    ", ".join(missing), level=logging.WARNING)
    if not required:
        return None
    found = f" Incomplete, skipped: {'; '.join(skipped)}." if skipped else ""
    raise ValueError(
        f"No complete PruningTrainer checkpoint found under {' or '.join(folders)}.{found} Train from the start "
        f"(resume_from_checkpoint=None, or a new output_dir), or pass the path of a checkpoint-N folder."
    )


def config_differences(saved: dict, current: dict) -> list[str]:
    """The fields where two ``PruningConfig.to_dict()`` values differ, as ``"name: A in the checkpoint, B now"``.

    ``saved`` is first read as a ``PruningConfig`` (when it still is one), so that options added to a
    method since the checkpoint was written compare at their defaults. A method's options are
    compared one by one, under their own names; tuples and lists compare equal.
    """
    from .config import PruningConfig  # here: the configs import the methods, which this module does not need

    try:
        saved = PruningConfig.from_dict(dict(saved)).to_dict()
    except (TypeError, ValueError):
        pass  # not a valid config for this version any more: compare what was stored
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    order: dict[str, int] = {}
    for name in [*flat_current, *flat_saved]:
        order.setdefault(name, len(order))
    return [
        f"{name}: {_show(flat_saved, name)} in the checkpoint, {_show(flat_current, name)} now"
        for name in sorted(order, key=order.__getitem__)
        if flat_saved.get(name, _ABSENT) != flat_current.get(name, _ABSENT)
    ]


_ABSENT = object()


def _flatten(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    flat = {key: value for key, value in config.items() if key != "method_options"}
    options = config.get("method_options") or {}
    flat.update({key: value for key, value in options.items() if key not in flat})
    return flat


def _show(flat: dict, name: str) -> str:
    return repr(flat[name]) if name in flat else "(not set)"
