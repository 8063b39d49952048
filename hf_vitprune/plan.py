"""PruningPlan: which attention heads and MLP neurons each encoder layer keeps."""

from __future__ import annotations

import json
import operator
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .architectures import find_encoder_layers
from .fileio import atomic_directory, reject_unknown_fields

PLAN_FILE = "pruning_plan.json"


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is one (or a JSON object key spelling one), else None: no silent 1.5 -> 1."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return int(value) if re.fullmatch(r"-?\d+", value.strip()) else None
    try:
        return operator.index(value)  # int, numpy/torch integers
    except TypeError:
        return None


def _index_map(name: str, value: object) -> dict[int, list[int]]:
    if not isinstance(value, dict):
        raise ValueError(f"PruningPlan.{name} must map layer index -> list of kept indices, got {type(value).__name__}.")
    result = {}
    for layer, kept in value.items():
        layer_index = _as_int(layer)
        if layer_index is None:
            raise ValueError(f"PruningPlan.{name} has layer key {layer!r}; layer keys must be integers.")
        if layer_index < 0:
            raise ValueError(f"PruningPlan.{name} has negative layer index {layer_index}; use 0-based indices.")
        if isinstance(kept, (str, bytes)) or not hasattr(kept, "__iter__"):
            raise ValueError(f"PruningPlan.{name}[{layer_index}] must be a list of integers, got {kept!r}.")
        indices = [_as_int(i) for i in kept]
        if any(i is None for i in indices):
            bad = [i for i, parsed in zip(kept, indices) if parsed is None]
            raise ValueError(
                f"PruningPlan.{name}[{layer_index}] has non-integer indices {bad}; indices must be integers."
            )
        if any(i < 0 for i in indices):
            raise ValueError(f"PruningPlan.{name}[{layer_index}] has a negative index: {sorted(indices)}.")
        duplicates = sorted(i for i, n in Counter(indices).items() if n > 1)
        if duplicates:
            raise ValueError(
                f"PruningPlan.{name}[{layer_index}] lists {duplicates} more than once; each kept index must appear once."
            )
        result[layer_index] = sorted(indices)
    return dict(sorted(result.items()))


@dataclass
class PruningPlan:
    """Kept attention heads and MLP neurons per encoder layer; a layer not named keeps everything.

    Indices refer to the model the plan is applied to. A layer may lose all its heads (or all
    its MLP neurons) only when ``allow_empty_attention`` (``allow_empty_mlp``) is set: the branch
    then reduces to its output bias.
    """

    heads: dict[int, list[int]] = field(default_factory=dict)
    neurons: dict[int, list[int]] = field(default_factory=dict)
    allow_empty_attention: bool = False
    allow_empty_mlp: bool = False

    def __post_init__(self):
        self.heads = _index_map("heads", self.heads)
        self.neurons = _index_map("neurons", self.neurons)
        for name, mapping, allowed, option in (
            ("heads", self.heads, self.allow_empty_attention, "allow_empty_attention"),
            ("neurons", self.neurons, self.allow_empty_mlp, "allow_empty_mlp"),
        ):
            empty = [layer for layer, kept in mapping.items() if not kept]
            if empty and not allowed:
                raise ValueError(
                    f"PruningPlan.{name} leaves layers {empty} with nothing kept. Keep at least one, or pass "
                    f"{option}=True to remove that whole branch."
                )

    def kept_heads(self, layer: int, num_heads: int) -> list[int]:
        return self.heads.get(layer, list(range(num_heads)))

    def kept_neurons(self, layer: int, num_neurons: int) -> list[int]:
        return self.neurons.get(layer, list(range(num_neurons)))

    def validate(self, model: nn.Module) -> None:
        """Raise ValueError if the plan names a layer or a unit that ``model`` does not have."""
        layers = find_encoder_layers(model)
        for name, mapping, size_of in (
            ("heads", self.heads, lambda layer: layer.num_heads),
            ("neurons", self.neurons, lambda layer: layer.num_neurons),
        ):
            for index, kept in mapping.items():
                if index >= len(layers):
                    raise ValueError(
                        f"PruningPlan.{name} names layer {index}, but the model has {len(layers)} layers "
                        f"(0..{len(layers) - 1})."
                    )
                size = size_of(layers[index])
                out_of_range = [i for i in kept if i >= size]
                if out_of_range:
                    raise ValueError(
                        f"PruningPlan.{name}[{index}] keeps {out_of_range}, but layer {index} has {size} {name} "
                        f"(valid indices 0..{size - 1})."
                    )

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        return {
            "heads": {str(k): v for k, v in self.heads.items()},
            "neurons": {str(k): v for k, v in self.neurons.items()},
            "allow_empty_attention": self.allow_empty_attention,
            "allow_empty_mlp": self.allow_empty_mlp,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        reject_unknown_fields(cls, data)
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> PruningPlan:
        return cls.from_dict(json.loads(text))

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``pruning_plan.json`` into ``save_directory`` (atomically)."""
        with atomic_directory(save_directory) as staging:
            (staging / PLAN_FILE).write_text(self.to_json_string())
        return Path(save_directory) / PLAN_FILE

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PruningPlan:
        path = Path(directory)
        path = path / PLAN_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"No {PLAN_FILE} at {path}; save one with PruningPlan.save_pretrained(dir).")
        return cls.from_json_string(path.read_text())
