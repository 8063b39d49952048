"""PruningPlan: which units (attention heads, MLP neurons, other registered kinds) each encoder layer keeps."""

from __future__ import annotations

import json
import operator
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from .architectures import BUILTIN_UNIT_KINDS, UNIT_KINDS, UnitKind, embedding_width, find_encoder_layers, unit_kind
from .fileio import atomic_directory, read_json_object

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


def _other_kind(name: object, where: str) -> UnitKind:
    if name in BUILTIN_UNIT_KINDS:
        raise ValueError(f"PruningPlan.{where} names {name!r}; give {name} with PruningPlan({name}=...) instead.")
    if name not in UNIT_KINDS:
        raise ValueError(
            f"PruningPlan.{where} names unknown unit kind {name!r}; registered kinds are {list(UNIT_KINDS)}."
        )
    return UNIT_KINDS[name]


@dataclass
class PruningPlan:
    """Kept units per encoder layer and kind; a layer not named keeps everything.

    Heads and neurons have their own fields; kinds registered with
    ``architectures.register_unit_kind`` go in ``other_units`` (by kind name). Indices refer
    to the model the plan is applied to. A layer may keep no unit of a kind only when that is
    allowed: ``allow_empty_attention`` (heads), ``allow_empty_mlp`` (neurons), or the kind's
    name in ``other_allow_empty``; the branch then reduces to what its units do not own.
    ``embedding`` lists the residual-stream channels the whole model keeps (``None``: all of
    them; see :mod:`hf_vitprune.embedding`).
    """

    heads: dict[int, list[int]] = field(default_factory=dict)
    neurons: dict[int, list[int]] = field(default_factory=dict)
    allow_empty_attention: bool = False
    allow_empty_mlp: bool = False
    other_units: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    other_allow_empty: frozenset[str] = frozenset()
    embedding: list[int] | None = None

    def __post_init__(self):
        if self.embedding is not None:
            try:
                kept = _index_map("embedding", {0: self.embedding})[0]
            except ValueError as error:
                raise ValueError(str(error).replace("embedding[0]", "embedding")) from None
            if not kept:
                raise ValueError("PruningPlan.embedding keeps no channel; keep at least one, or None to keep all.")
            self.embedding = kept
        self.heads = _index_map("heads", self.heads)
        self.neurons = _index_map("neurons", self.neurons)
        if not isinstance(self.other_units, Mapping):
            raise ValueError(
                f"PruningPlan.other_units must map unit kind name -> layer index -> kept indices, "
                f"got {type(self.other_units).__name__}."
            )
        other = {_other_kind(name, "other_units").name: _index_map(name, m) for name, m in self.other_units.items()}
        self.other_units = {name: other[name] for name in sorted(other) if other[name]}  # {} keeps all, as absent
        if isinstance(self.other_allow_empty, str) or not isinstance(self.other_allow_empty, Iterable):
            raise ValueError(
                f"PruningPlan.other_allow_empty must be a set of unit kind names, got {self.other_allow_empty!r}."
            )
        self.other_allow_empty = frozenset(_other_kind(n, "other_allow_empty").name for n in self.other_allow_empty)
        for kind in UNIT_KINDS.values():
            empty = [layer for layer, kept in self.units_of(kind.name).items() if not kept]
            if empty and not self.allows_empty(kind.name):
                builtin = kind.name in BUILTIN_UNIT_KINDS
                option = f"{kind.allow_empty}=True" if builtin else f"other_allow_empty={{{kind.name!r}}}"
                raise ValueError(
                    f"PruningPlan.{kind.name} leaves layers {empty} with nothing kept. Keep at least one, or pass "
                    f"{option} to remove that whole branch."
                )

    @classmethod
    def of(cls, kept: Mapping[str, Mapping[int, Sequence[int]]], allow_empty: Iterable[str] = ()) -> PruningPlan:
        """The plan keeping ``kept[kind][layer]`` for every named kind; ``allow_empty`` names the kinds whose
        layers may keep none. The generic spelling of ``PruningPlan(heads=..., neurons=..., ...)``."""
        allow_empty = set(allow_empty)
        for name in (*kept, *allow_empty):
            unit_kind(name)
        return cls(
            heads=dict(kept.get("heads", {})),
            neurons=dict(kept.get("neurons", {})),
            allow_empty_attention="heads" in allow_empty,
            allow_empty_mlp="neurons" in allow_empty,
            other_units={name: dict(m) for name, m in kept.items() if name not in BUILTIN_UNIT_KINDS},
            other_allow_empty={name for name in allow_empty if name not in BUILTIN_UNIT_KINDS},
        )

    def units_of(self, kind: str) -> dict[int, list[int]]:
        """Layer index -> kept indices of the kind called ``kind`` (empty: every layer keeps all)."""
        if kind in BUILTIN_UNIT_KINDS:
            return getattr(self, kind)
        return self.other_units.get(unit_kind(kind).name, {})

    def allows_empty(self, kind: str) -> bool:
        """Whether a layer may keep no unit of the kind called ``kind``."""
        if kind in BUILTIN_UNIT_KINDS:
            return bool(getattr(self, unit_kind(kind).allow_empty))
        return kind in self.other_allow_empty

    def kept(self, kind: str, layer: int, width: int) -> list[int]:
        """The indices of ``kind`` that ``layer`` keeps, out of its ``width`` units."""
        return self.units_of(kind).get(layer, list(range(width)))

    def kept_heads(self, layer: int, num_heads: int) -> list[int]:
        return self.kept("heads", layer, num_heads)

    def kept_neurons(self, layer: int, num_neurons: int) -> list[int]:
        return self.kept("neurons", layer, num_neurons)

    def then(self, later: PruningPlan, model: nn.Module) -> PruningPlan:
        """The one plan that applying ``self`` to ``model`` and then ``later`` (whose indices refer to the model
        ``self`` leaves) amounts to, with indices into ``model``: a search that compacts in steps records
        what it kept against the original model this way. A layer either plan names is named."""
        self.validate(model)
        layers = find_encoder_layers(model)
        kept = {}
        for kind in UNIT_KINDS.values():
            per_layer = {}
            for layer in layers:
                if layer.index in self.units_of(kind.name) or layer.index in later.units_of(kind.name):
                    first = self.kept(kind.name, layer.index, kind.count(layer))
                    second = later.kept(kind.name, layer.index, len(first))
                    per_layer[layer.index] = [first[i] for i in second]
            if per_layer:
                kept[kind.name] = per_layer
        allow_empty = {kind.name for kind in UNIT_KINDS.values()
                       if self.allows_empty(kind.name) or later.allows_empty(kind.name)}
        plan = PruningPlan.of(kept, allow_empty)
        width = embedding_width(model)
        first = self.embedding if self.embedding is not None else list(range(width))
        second = later.embedding if later.embedding is not None else list(range(len(first)))
        if self.embedding is not None or later.embedding is not None:
            plan = replace(plan, embedding=[first[i] for i in second])
        return plan

    def validate(self, model: nn.Module) -> None:
        """Raise ValueError if the plan names a layer or a unit that ``model`` does not have.

        For an already pruned model the error says so: the usual cause is applying a plan made
        for the original model (the same plan twice, say) to its pruned version.
        """
        try:
            self._check_fits(model)
        except ValueError as error:
            model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
            if not model_type.startswith("pruned_"):
                raise
            raise ValueError(
                f"{error} The model was already pruned ({type(model).__name__}, model_type {model_type!r}); "
                f"this plan's indices seem to refer to the original model, but a plan's indices refer to the "
                f"model it is applied to. Apply it to the original (dense) model, or give indices into the "
                f"pruned model's layers."
            ) from None

    def _check_fits(self, model: nn.Module) -> None:
        layers = find_encoder_layers(model)
        if self.embedding is not None:
            width = embedding_width(model)
            out_of_range = [i for i in self.embedding if i >= width]
            if out_of_range:
                raise ValueError(
                    f"PruningPlan.embedding keeps {out_of_range}, but the model's embedding width is {width} "
                    f"(valid indices 0..{width - 1})."
                )
        for kind in UNIT_KINDS.values():
            name = kind.name
            for index, kept in self.units_of(name).items():
                if index >= len(layers):
                    raise ValueError(
                        f"PruningPlan.{name} names layer {index}, but the model has {len(layers)} layers "
                        f"(0..{len(layers) - 1})."
                    )
                size = kind.count(layers[index])
                out_of_range = [i for i in kept if i >= size]
                if out_of_range:
                    raise ValueError(
                        f"PruningPlan.{name}[{index}] keeps {out_of_range}, but layer {index} has {size} {name} "
                        f"(valid indices 0..{size - 1})."
                    )

    # ------------------------------------------------------------------ serialisation
    # Heads and neurons are stored as they always were; another kind adds its name and its
    # allow-empty flag as top-level keys.

    def to_dict(self) -> dict:
        data = {
            "heads": {str(k): v for k, v in self.heads.items()},
            "neurons": {str(k): v for k, v in self.neurons.items()},
            "allow_empty_attention": self.allow_empty_attention,
            "allow_empty_mlp": self.allow_empty_mlp,
        }
        for name, mapping in self.other_units.items():
            data[name] = {str(k): v for k, v in mapping.items()}
        if self.embedding is not None:
            data["embedding"] = list(self.embedding)
        for name in {*self.other_units, *self.other_allow_empty}:
            data[unit_kind(name).allow_empty] = name in self.other_allow_empty
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        data = dict(data)
        fields = ["heads", "neurons", "allow_empty_attention", "allow_empty_mlp", "embedding"]
        other, allow_empty = {}, set()
        for kind in UNIT_KINDS.values():
            if kind.name in BUILTIN_UNIT_KINDS:
                continue
            fields += [kind.name, kind.allow_empty]
            if kind.name in data:
                other[kind.name] = data.pop(kind.name)
            if kind.allow_empty in data:
                flag = data.pop(kind.allow_empty)
                if not isinstance(flag, bool):
                    raise ValueError(f"PruningPlan field {kind.allow_empty!r} must be true or false, got {flag!r}.")
                if flag:
                    allow_empty.add(kind.name)
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"Unknown PruningPlan fields {unknown}; valid fields are {sorted(fields)}.")
        return cls(**data, other_units=other, other_allow_empty=allow_empty)

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
        """Load ``pruning_plan.json`` from ``directory`` (or that file itself); errors name the file."""
        path = Path(directory)
        path = path / PLAN_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"No {PLAN_FILE} at {path}; save one with PruningPlan.save_pretrained(dir).")
        fix = "Write it again with PruningPlan.save_pretrained(dir), or copy it from where the plan was made."
        data = read_json_object(path, fix)
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error} {fix}") from None
