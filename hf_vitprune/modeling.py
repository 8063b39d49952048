"""Pruned, heterogeneous versions of the supported families' config and model classes.

A pruned config is the dense config plus transformers' ``per_layer_config`` recording each
layer's unit counts under each unit kind's ``config_key`` (``num_attention_heads``,
``intermediate_size``; explicitly for every layer), and an explicit ``head_dim``. The stock
classes cannot be built from such a config (reading a per-layer attribute from the global
config raises), so each pruned class builds the stock model at the dense widths and then
compacts every layer to its recorded widths; the stock forward already infers head counts
from tensor shapes. The config also carries ``stock_class_guard`` (:data:`STOCK_CLASS_GUARD`),
which makes a stock class given a pruned directory fail at once with a hint to use the Auto
classes, instead of transformers' error about per-layer attributes.

Imports only torch, transformers (and safetensors, its dependency), ``.architectures``,
``.tokens``, ``.convolution`` and ``.fileio``: these files are copied next to saved models (``custom_object_save``) for
``trust_remote_code=True`` loading.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    BeitConfig,
    BeitForImageClassification,
    BeitModel,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    PreTrainedConfig,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
    ViTMSNConfig,
    ViTMSNForImageClassification,
    ViTMSNModel,
)

from .architectures import (
    BUILTIN_UNIT_KINDS,
    UNIT_KINDS,
    Family,
    UnitKind,
    compact_units,
    dense_head_dim,
    embedding_width,
    family_of,
    find_encoder_layers,
    find_shared_position_bias,
    mlp_layout,
)
from .convolution import CONFIG_KEY as LAYER_TYPE_KEY
from .convolution import attach_layer_types, layer_type_of
from .fileio import atomic_directory
from .tokens import CONFIG_KEY as TOKEN_CONFIG_KEY
from .tokens import TokenStages, attach_token_pruning


def dense_view(config: PreTrainedConfig) -> PreTrainedConfig:
    """A copy of ``config`` without per-layer overrides: the dense architecture it was pruned from."""
    dense = copy.copy(config)
    dense.__dict__.pop("_heterogeneity_spec", None)
    return dense


def layer_unit_counts(config: PreTrainedConfig) -> list[dict[str, int]]:
    """Per layer, kind name -> unit count, for every registered kind whose ``config_key`` the config records."""
    views = config.per_layer_config if config.is_heterogeneous else [config] * config.num_hidden_layers
    return [
        {kind.name: getattr(view, kind.config_key) for kind in UNIT_KINDS.values() if hasattr(view, kind.config_key)}
        for view in views
    ]


def recorded_layer_types(config: PreTrainedConfig) -> list[str] | None:
    """Each layer's type (``"attention"``, ``"conv1x1"``, ...) as ``per_layer_config`` records it, or None when it
    records none (every layer is attention)."""
    if not config.is_heterogeneous:
        return None
    types = [getattr(view, LAYER_TYPE_KEY, None) for view in config.per_layer_config]
    return types if any(t is not None for t in types) else None


def layer_widths(config: PreTrainedConfig) -> list[tuple[int, int]]:
    """(heads, MLP width) of every layer as the config records them."""
    return [(counts["heads"], counts["neurons"]) for counts in layer_unit_counts(config)]


class PrunedModelMixin:
    """Builds the stock model at the dense widths, then compacts each layer to the recorded ones."""

    def __init__(self, config: PreTrainedConfig, *args, **kwargs):
        dense = dense_view(config)
        super().__init__(dense, *args, **kwargs)
        adopt_config(self, dense, config)
        types = recorded_layer_types(config)
        if types is not None:  # a hybrid model: its convolution layers, at the dense widths
            attach_layer_types(self, types)
        layers = find_encoder_layers(self)
        recorded = layer_unit_counts(config)
        if len(layers) != len(recorded):
            raise ValueError(f"The config records {len(recorded)} layers but the model has {len(layers)}.")
        for layer, counts in zip(layers, recorded):
            available = {name: UNIT_KINDS[name].count(layer) for name in counts}
            if any(counts[name] > available[name] for name in counts):
                given = " and ".join(f"{n} {UNIT_KINDS[name].label}" for name, n in counts.items())
                raise ValueError(
                    f"Layer {layer.index} records {given}, more than the dense architecture's "
                    f"{' and '.join(str(n) for n in available.values())}; the config is inconsistent."
                )
            compact_units(layer, {name: range(n) for name, n in counts.items()})
        stages = getattr(config, TOKEN_CONFIG_KEY, None)
        if stages:  # a token-pruned model: rebuild its selectors and hooks
            attach_token_pruning(self, TokenStages.from_dict(stages))

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """As transformers' ``save_pretrained``, but atomic: a failed save leaves ``save_directory`` as it was."""
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", Path(save_directory).name)
        with atomic_directory(save_directory) as staging:
            return super().save_pretrained(staging, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, ignore_mismatched_sizes: bool = False, output_loading_info: bool = False, **kwargs):
        """As transformers' ``from_pretrained``; weights whose shapes disagree with the widths the config
        records raise a ValueError naming the layer and both shapes (instead of a generic report), and an
        unreadable (truncated) weight file an OSError naming the file."""
        try:
            model, info = super().from_pretrained(
                *args, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
            )
        except Exception as error:  # safetensors' own error names no file
            if type(error).__name__ != "SafetensorError":
                raise
            name = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise OSError(_unreadable_weights_message(name, kwargs.get("subfolder") or "", error)) from error
        mismatched = sorted(info.get("mismatched_keys", []))
        if mismatched and not ignore_mismatched_sizes:
            key, stored, expected = mismatched[0]
            layer = re.search(r"\.(\d+)\.", key)
            where = f"encoder layer {layer.group(1)}" if layer else "a non-encoder module"
            raise ValueError(
                f"Weight {key!r} ({where}) has shape {list(stored)} in the checkpoint, but the widths recorded in "
                f"config.json require {list(expected)} ({len(mismatched)} mismatched tensors in all). The config's "
                f"per_layer_config does not describe these weights: re-save the model with save_pretrained, or "
                f"correct per_layer_config."
            )
        _own_aligned_memory(model)
        return (model, info) if output_loading_info else model


def _unreadable_weights_message(name_or_path: object, subfolder: str, error: Exception) -> str:
    """Which weight files of ``name_or_path`` safetensors cannot read, and how to get good ones."""
    directory = Path(str(name_or_path), subfolder)
    where = f"of {name_or_path} (in the Hugging Face cache)"
    if directory.is_dir():
        from safetensors import safe_open  # a dependency of transformers

        broken = []
        for path in sorted(directory.glob("*.safetensors")):
            try:
                with safe_open(path, framework="pt"):
                    pass
            except Exception:
                broken.append(str(path))
        where = ", ".join(broken) if broken else f"in {directory}"
    return (
        f"Cannot read the weights {where}: {error}. The file is truncated or corrupt (an interrupted save, copy or "
        f"download): re-save the model with save_pretrained, or download it again with "
        f"from_pretrained(..., force_download=True)."
    )


def _own_aligned_memory(model: nn.Module) -> None:
    """Copy tensors that are unaligned views into the checkpoint's memory map into fresh memory.

    Pruned widths (26 neurons, say) put many tensors at offsets in model.safetensors that are not
    64-byte aligned; the CPU BLAS then takes other kernels than for the in-memory model's freshly
    allocated weights, and logits differ in the last bit. Fresh (aligned) copies keep them identical.
    """
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


def adopt_config(model: nn.Module, old: PreTrainedConfig, new: PreTrainedConfig) -> None:
    """Point every submodule that held ``old`` at ``new``, so attention-implementation changes reach all."""
    new._attn_implementation_internal = old._attn_implementation_internal
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


# --------------------------------------------------------------------------- the classes


class PrunedViTConfig(ViTConfig):
    model_type = "pruned_vit"


class PrunedDeiTConfig(DeiTConfig):
    model_type = "pruned_deit"


class PrunedViTMSNConfig(ViTMSNConfig):
    model_type = "pruned_vit_msn"


class PrunedBeitConfig(BeitConfig):
    model_type = "pruned_beit"


class PrunedDinov2Config(Dinov2Config):
    model_type = "pruned_dinov2"


class PrunedViTModel(PrunedModelMixin, ViTModel):
    config_class = PrunedViTConfig


class PrunedViTForImageClassification(PrunedModelMixin, ViTForImageClassification):
    config_class = PrunedViTConfig


class PrunedDeiTModel(PrunedModelMixin, DeiTModel):
    config_class = PrunedDeiTConfig


class PrunedDeiTForImageClassification(PrunedModelMixin, DeiTForImageClassification):
    config_class = PrunedDeiTConfig


class PrunedDeiTForImageClassificationWithTeacher(PrunedModelMixin, DeiTForImageClassificationWithTeacher):
    config_class = PrunedDeiTConfig


class PrunedViTMSNModel(PrunedModelMixin, ViTMSNModel):
    config_class = PrunedViTMSNConfig


class PrunedViTMSNForImageClassification(PrunedModelMixin, ViTMSNForImageClassification):
    config_class = PrunedViTMSNConfig


class PrunedBeitModel(PrunedModelMixin, BeitModel):
    config_class = PrunedBeitConfig


class PrunedBeitForImageClassification(PrunedModelMixin, BeitForImageClassification):
    config_class = PrunedBeitConfig


class PrunedDinov2Model(PrunedModelMixin, Dinov2Model):
    config_class = PrunedDinov2Config


class PrunedDinov2ForImageClassification(PrunedModelMixin, Dinov2ForImageClassification):
    config_class = PrunedDinov2Config


PRUNED_CONFIGS = {
    cls.model_type: cls
    for cls in (PrunedViTConfig, PrunedDeiTConfig, PrunedViTMSNConfig, PrunedBeitConfig, PrunedDinov2Config)
}
BACKBONES = (PrunedViTModel, PrunedDeiTModel, PrunedViTMSNModel, PrunedBeitModel, PrunedDinov2Model)
CLASSIFIERS = (
    PrunedViTForImageClassification,
    PrunedDeiTForImageClassification,
    PrunedDeiTForImageClassificationWithTeacher,
    PrunedViTMSNForImageClassification,
    PrunedBeitForImageClassification,
    PrunedDinov2ForImageClassification,
)
PRUNED_CLASSES = {cls.__name__[len("Pruned") :]: cls for cls in (*BACKBONES, *CLASSIFIERS)}

# save_pretrained copies this file (and .architectures) and writes `auto_map` for these.
for _config_class in PRUNED_CONFIGS.values():
    _config_class._auto_class = "AutoConfig"
for _model_class in BACKBONES:
    _model_class._auto_class = "AutoModel"
for _model_class in CLASSIFIERS:
    _model_class._auto_class = "AutoModelForImageClassification"


def auto_class_for(config: PreTrainedConfig) -> type:
    """The Auto class that loads a saved model of ``config``: the image-classification one for classifiers (by
    ``config.architectures``), ``AutoModel`` for backbones."""
    classifier = any("ForImageClassification" in name for name in config.architectures or ())
    return AutoModelForImageClassification if classifier else AutoModel


def register_auto_classes() -> None:
    """Make ``AutoConfig``/``AutoModel``/``AutoModelForImageClassification`` know the pruned types."""
    for config_class in PRUNED_CONFIGS.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for model_class in BACKBONES:
        AutoModel.register(model_class.config_class, model_class, exist_ok=True)
    by_config: dict[type, list[type]] = {}
    for model_class in CLASSIFIERS:
        by_config.setdefault(model_class.config_class, []).append(model_class)
    for config_class, classes in by_config.items():
        # several heads per config (DeiT with/without teacher): Auto picks by config.architectures
        value = classes[0] if len(classes) == 1 else tuple(classes)
        AutoModelForImageClassification._model_mapping.register(config_class, value, exist_ok=True)


# A config.json key that makes the stock classes stop early with a hint. Given a config.json of
# another model_type, a stock config class reads instead a nested dict whose "model_type" is its
# own (PreTrainedConfig.from_pretrained); this dict's text "num_hidden_layers" then fails its
# type check, and transformers' error quotes the text. The pruned classes ignore the key.
STOCK_CLASS_GUARD = "stock_class_guard"


def _stock_class_guard(family: Family, auto: str) -> dict:
    return {
        "model_type": family.model_type,
        "num_hidden_layers": (
            f"This is a model pruned by hf_vitprune (model_type {family.pruned_model_type!r}): its layers differ in "
            f"width, which the stock classes ({', '.join(family.model_classes)}) cannot build. Load it with "
            f"{auto}.from_pretrained(...) after `import hf_vitprune`, or with "
            f"{auto}.from_pretrained(..., trust_remote_code=True)."
        ),
    }


def _mlp_ratio_for(mlp: nn.Module, config: PreTrainedConfig, width: int, needed: int) -> int:
    """The smallest integer ``mlp_ratio`` with which ``type(mlp)`` builds at least ``needed`` neurons for ``width``."""
    ratio = max(1, -(-needed // width))
    view = copy.copy(config)
    view.hidden_size = width
    while True:
        view.mlp_ratio = ratio
        with torch.device("meta"):
            built = type(mlp)(view)
        _, out_name = mlp_layout(built)
        if getattr(built, out_name).in_features >= needed:
            return ratio
        ratio += 1


def is_recorded(kind: UnitKind, counts: list[int], config: PreTrainedConfig) -> bool:
    """Whether ``kind``, with these per-layer ``counts``, is recorded in per_layer_config (and listed in
    statistics): heads and neurons always; another kind where some layer has units of it, or, for a kind
    with a ``default``, where some layer differs from it."""
    if kind.name in BUILTIN_UNIT_KINDS:
        return True
    if kind.default is not None:
        default = kind.default(dense_view(config))
        return any(n != default for n in counts)
    return any(counts)


def convert_to_pruned(model: nn.Module) -> nn.Module:
    """Turn a (just compacted) stock model into its pruned class, with a config built from its shapes."""
    family = family_of(model)
    stock_name = type(model).__name__.removeprefix("Pruned")
    layers = find_encoder_layers(model)
    old = model.config
    dense = dense_view(old)
    values = dense.to_dict()
    for key in ("model_type", "per_layer_config", "auto_map", "architectures", "transformers_version"):
        values.pop(key, None)
    # the width the layers are built with before compaction (and the one attention scaling derives from)
    values["head_dim"] = dense_head_dim(dense)
    counts = [{kind.config_key: kind.count(layer) for kind in UNIT_KINDS.values()} for layer in layers]
    width = embedding_width(model)
    if width != values["hidden_size"]:
        if "mlp_ratio" in values:  # DINOv2 derives the MLP width from hidden_size (an integer ratio)
            needed = max(c["intermediate_size"] for c in counts)
            values["mlp_ratio"] = _mlp_ratio_for(layers[0].mlp, dense, width, needed)
        values["hidden_size"] = width
    # every layer has heads and neurons (maybe none left); another kind is recorded where the model has it
    keys = [
        kind.config_key
        for kind in UNIT_KINDS.values()
        if is_recorded(kind, [c[kind.config_key] for c in counts], old)
    ]
    for key in keys:  # a global value too, for configs that derive it (Dinov2's intermediate_size)
        values.setdefault(key, max(c[key] for c in counts))
    if any(layer.is_convolution for layer in layers):  # a hybrid model: every layer's type
        keys.append(LAYER_TYPE_KEY)
        for layer, c in zip(layers, counts):
            c[LAYER_TYPE_KEY] = layer_type_of(layer)
    if values.get("use_shared_relative_position_bias") and find_shared_position_bias(model) is None:
        # the shared table was copied into every layer (architectures.unshare_position_bias)
        values["use_shared_relative_position_bias"] = False
        values["use_relative_position_bias"] = True
    values[STOCK_CLASS_GUARD] = _stock_class_guard(family, PRUNED_CLASSES[stock_name]._auto_class)
    config_class = PRUNED_CONFIGS[family.pruned_model_type]
    new = config_class(
        **values,
        architectures=[PRUNED_CLASSES[stock_name].__name__],
        per_layer_config={layer.index: {key: c[key] for key in keys} for layer, c in zip(layers, counts)},
    )
    adopt_config(model, old, new)
    model.config = new
    model.__class__ = PRUNED_CLASSES[stock_name]
    return model
