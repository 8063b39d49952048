"""PruningConfig: the whole pruning recipe, validated on creation, saved as pruning_config.json.

The common fields (method, budget, which units may go, calibration, distillation) live here;
each method's own options live with the method, as a dataclass registered with it
(:mod:`hf_vitprune.methods`), and ``PruningConfig.method_options`` holds an instance of it.
For convenience a method's options may also be given as keywords of ``PruningConfig`` itself;
these two are the same config (``damping`` is an option of the default method)::

    PruningConfig(target_sparsity=0.4, damping=0.9)
    PruningConfig(target_sparsity=0.4, method_options={"damping": 0.9})
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budget import Budget
from .fileio import atomic_directory, reject_unknown_fields
from .methods import DEFAULT_METHOD, METHODS, MethodOptions, get_method

CONFIG_FILE = "pruning_config.json"


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


@dataclass
class PruningConfig:
    """How to prune: the method and its options, the budget, the units, calibration and distillation.

    Exactly one budget is set: ``target_sparsity`` (fraction of all parameters removed) or
    ``target_flops_reduction`` (fraction of forward FLOPs removed); :attr:`budget` is the one
    derived from them. The compacted model hits it to within one unit's cost (0.5% in practice).
    """

    method: str = field(
        default=DEFAULT_METHOD, **_help("The pruning method, a name registered in hf_vitprune.methods.")
    )
    target_sparsity: float | None = field(
        default=None, **_help("Fraction of the model's parameters to remove, in (0, 1), e.g. 0.4.")
    )
    target_flops_reduction: float | None = field(
        default=None, **_help("Fraction of forward FLOPs per image to remove, in (0, 1); instead of target_sparsity.")
    )
    target_latency_reduction: float | None = field(
        default=None, **_help("Fraction of the latency measured on this machine to remove, in (0, 1); for methods "
                              "that measure it (spvit_tokens), instead of the other two.")
    )
    prune_heads: bool = field(default=True, **_help("Remove whole attention heads."))
    prune_neurons: bool = field(default=True, **_help("Remove MLP neurons (rows of fc1, columns of fc2)."))
    min_heads_per_layer: int = field(
        default=1, **_help("Heads every layer keeps; 0 allows removing a layer's whole attention branch.")
    )
    min_neurons_per_layer: int = field(
        default=1, **_help("MLP neurons every layer keeps; 0 allows removing a layer's whole MLP.")
    )
    round_heads_to: int = field(default=1, **_help("Kept heads per layer are a multiple of this (hardware-friendly)."))
    round_neurons_to: int = field(
        default=1, **_help("Kept MLP neurons per layer are a multiple of this, e.g. 8 or 64 for tensor cores.")
    )
    calibration_samples: int = field(
        default=256, **_help("Training images the method may run through the dense model (to rank units, say).")
    )
    distillation_weight: float = field(
        default=0.5, **_help("Weight of the distillation loss from the frozen dense model during fine-tuning; 0 disables it.")
    )
    distillation_temperature: float = field(default=2.0, **_help("Softmax temperature of the distillation loss."))
    use_distillation_token: bool = field(
        default=True, **_help("For DeiT with a distillation head, distil through that head (DeiT-style).")
    )
    method_options: Any = field(
        default=None,
        **_help("The method's own options: its options dataclass, a dict (or JSON object) of them, or None for "
                "the defaults."),
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(
                f"PruningConfig.method={self.method!r} is unknown; choose one of {', '.join(sorted(METHODS))} "
                f"(or register a new one with hf_vitprune.methods.register_method)."
            )
        budget = self.budget  # validates the targets
        accepted = get_method(self.method).budgets
        if budget.metric not in accepted:
            takes = " or ".join(Budget.METRICS[metric] for metric in accepted)
            raise ValueError(
                f"Method {self.method!r} takes {takes}, not {budget.target_name}"
                + (" (it removes no parameters)" if budget.metric == "params" else "")
                + f". Set {takes} instead."
            )
        for name in ("prune_heads", "prune_neurons", "use_distillation_token"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PruningConfig.{name}={getattr(self, name)!r} must be True or False.")
        if not (self.prune_heads or self.prune_neurons):
            raise ValueError("PruningConfig prunes nothing: set prune_heads or prune_neurons to True.")
        for name, minimum in (("min_heads_per_layer", 0), ("min_neurons_per_layer", 0), ("round_heads_to", 1),
                              ("round_neurons_to", 1), ("calibration_samples", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"PruningConfig.{name}={value!r} must be an integer >= {minimum}.")
        if not _is_number(self.distillation_temperature) or not self.distillation_temperature > 0:
            raise ValueError(f"PruningConfig.distillation_temperature={self.distillation_temperature!r} must be > 0.")
        if not _is_number(self.distillation_weight) or not 0 <= self.distillation_weight <= 1:
            raise ValueError(f"PruningConfig.distillation_weight={self.distillation_weight!r} must lie in [0, 1].")
        self.method_options = self._resolve_options(self.method_options)

    def _resolve_options(self, options: Any) -> MethodOptions:
        options_class = get_method(self.method).options_class
        if options is None:
            return options_class()
        if isinstance(options, options_class):
            return options
        if isinstance(options, MethodOptions):
            raise ValueError(
                f"PruningConfig.method_options is a {type(options).__name__}, but method {self.method!r} takes "
                f"{options_class.__name__}; pass that, a dict of its fields, or None."
            )
        if isinstance(options, str):  # a JSON object, as a command line gives it
            try:
                options = json.loads(options)
            except json.JSONDecodeError as error:
                raise ValueError(f"PruningConfig.method_options={options!r} is not a JSON object ({error}).") from None
        if isinstance(options, dict):
            return options_class.from_dict(options, self.method)
        raise ValueError(
            f"PruningConfig.method_options must be a {options_class.__name__}, a dict or None, "
            f"got {type(options).__name__}."
        )

    # ------------------------------------------------------------------ derived

    @property
    def budget(self) -> Budget:
        """The one budget this config sets (validated: a fraction strictly between 0 and 1)."""
        return Budget.from_targets(self.target_sparsity, self.target_flops_reduction, self.target_latency_reduction)

    def selection_arguments(self) -> dict:
        """Keyword arguments of :func:`hf_vitprune.budget.select_plan` for this config's budget and units."""
        return dict(
            target_sparsity=self.target_sparsity,
            target_flops_reduction=self.target_flops_reduction,
            min_heads_per_layer=self.min_heads_per_layer,
            min_neurons_per_layer=self.min_neurons_per_layer,
            round_heads_to=self.round_heads_to,
            round_neurons_to=self.round_neurons_to,
            prune_heads=self.prune_heads,
            prune_neurons=self.prune_neurons,
        )

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method_options"}
        values["method_options"] = self.method_options.to_dict()
        return values

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> PruningConfig:
        """The config of :meth:`to_dict`; also reads the flat files written before options moved to methods."""
        data = dict(data)
        if "method_options" not in data:
            data = _from_flat(data)
        reject_unknown_fields(cls, data)
        return cls(**data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``pruning_config.json`` into ``save_directory``."""
        with atomic_directory(save_directory) as staging:
            (staging / CONFIG_FILE).write_text(self.to_json_string())
        return Path(save_directory) / CONFIG_FILE

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs) -> PruningConfig:
        """Load from a local directory (or file), or from a Hub repo id (``hf_hub_download``)."""
        path = Path(name_or_path)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.is_file():
            if Path(name_or_path).exists() or str(name_or_path).startswith((".", "/")):
                raise FileNotFoundError(f"No {CONFIG_FILE} in {name_or_path}; save one with PruningConfig.save_pretrained.")
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(name_or_path), CONFIG_FILE, **hub_kwargs))
        from .fileio import read_json_object

        fix = (
            "Write it again with PruningConfig.save_pretrained(dir), or download it again "
            "(hf_hub_download(..., force_download=True))."
        )
        data = read_json_object(path, fix)
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def _common_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(PruningConfig)}


def option_owners() -> dict[str, set[str]]:
    """Option name -> the methods that have it."""
    owners: dict[str, set[str]] = {}
    for name, method in METHODS.items():
        for f in dataclasses.fields(method.options_class):
            owners.setdefault(f.name, set()).add(name)
    return owners


def _from_flat(data: dict) -> dict:
    """A flat (pre-plug-in) config: every method's options sat beside the common fields.

    The chosen method's options move into ``method_options``; the other methods' options, which
    those files carried at their defaults, are dropped; anything else stays and is rejected.
    """
    method = data.get("method", DEFAULT_METHOD)
    own = {f.name for f in dataclasses.fields(get_method(method).options_class)} if method in METHODS else set()
    owners, common = option_owners(), _common_fields()
    options = {key: data.pop(key) for key in list(data) if key in own}
    for key in list(data):
        if key not in common and key in owners:
            del data[key]
    data["method_options"] = options
    return data


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- method options as PruningConfig keywords

_dataclass_init = PruningConfig.__init__


@functools.wraps(_dataclass_init)
def _init_with_option_keywords(self, *args, **kwargs):
    """``PruningConfig(..., damping=0.9)``: keywords that are not common fields are the method's options."""
    common = _common_fields()
    extra = {key: kwargs.pop(key) for key in list(kwargs) if key not in common}
    if extra:
        options = kwargs.get("method_options")
        if isinstance(options, MethodOptions):
            options = options.to_dict()
        options = dict(options or {})
        clash = sorted(set(options) & set(extra))
        if clash:
            raise ValueError(f"PruningConfig got {clash} both as keywords and in method_options; give each once.")
        kwargs["method_options"] = {**options, **extra}
    _dataclass_init(self, *args, **kwargs)


PruningConfig.__init__ = _init_with_option_keywords


def pruning_arguments(method: str | None = None) -> type:
    """One flat dataclass with the common fields and every registered method's options, for
    ``HfArgumentParser``: every option is a flag; :func:`config_from_arguments` builds the config.

    An option several methods share (``search_fraction``) is one flag; its default is ``method``'s
    (the default method's when None), so a run of that method gets its own defaults."""
    fields_, seen = [], set()
    chosen = METHODS.get(method or DEFAULT_METHOD)
    others = [cls for cls in METHODS.values() if cls is not chosen]
    sources = [PruningConfig, *(cls.options_class for cls in ([chosen] if chosen else []) + others)]
    for source in sources:
        types = typing.get_type_hints(source)
        for f in dataclasses.fields(source):
            if f.name == "method_options" or f.name in seen:
                continue
            seen.add(f.name)
            fields_.append((f.name, types[f.name], field(default=f.default, metadata=dict(f.metadata))))
    return dataclasses.make_dataclass("PruningArguments", fields_)


def config_from_arguments(arguments: Any) -> PruningConfig:
    """The :class:`PruningConfig` of parsed :func:`pruning_arguments`; an option of another method set
    away from its default is an error (it would be ignored silently otherwise)."""
    values = dataclasses.asdict(arguments)
    method = values.get("method", DEFAULT_METHOD)
    own = {f.name for f in dataclasses.fields(get_method(method).options_class)}
    common = _common_fields()
    defaults = {f.name: f.default for f in dataclasses.fields(arguments)}
    options = {}
    for key, value in values.items():
        if key in common:
            continue
        if key in own:
            options[key] = value
        elif value != defaults[key]:
            owners = sorted(option_owners().get(key, ()))
            raise ValueError(
                f"--{key} is an option of {', '.join(owners)}, not of method {method!r}; drop it or choose "
                f"--method {' or '.join(owners)}."
            )
    return PruningConfig(**{k: v for k, v in values.items() if k in common}, method_options=options)
