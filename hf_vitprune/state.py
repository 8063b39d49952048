"""The pruning state a checkpoint carries, so that ``resume_from_checkpoint`` continues exactly."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .fileio import atomic_directory
from .plan import PruningPlan

STATE_JSON = "pruning_state.json"
STATE_TENSORS = "pruning_state.safetensors"
FINETUNE = "finetune"  # the phase after compaction; the search phase is named by the method


@dataclass
class PruningState:
    """Phase, the method's state tensors and the plan; JSON plus safetensors, no pickles."""

    phase: str = FINETUNE
    plan: PruningPlan | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, directory: str | os.PathLike) -> None:
        meta = {"phase": self.phase, "plan": self.plan.to_dict() if self.plan is not None else None}
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
                f"{directory} holds no {STATE_JSON}: it is not a PruningTrainer checkpoint. Resume from a "
                f"checkpoint-N folder that a PruningTrainer wrote."
            )
        meta = json.loads(path.read_text())
        phase = meta.get("phase")
        if not (isinstance(phase, str) and phase.isidentifier()):
            raise ValueError(f"{path} has phase {phase!r}; expected {FINETUNE!r} or the name of a method's search phase.")
        plan = PruningPlan.from_dict(meta["plan"]) if meta.get("plan") else None
        tensors = load_file(str(directory / STATE_TENSORS)) if (directory / STATE_TENSORS).is_file() else {}
        return cls(meta["phase"], plan, tensors)
