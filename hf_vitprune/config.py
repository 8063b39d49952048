"""PruningConfig: the whole pruning recipe, validated on creation, saved as pruning_config.json."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .fileio import atomic_directory, reject_unknown_fields

CONFIG_FILE = "pruning_config.json"
METHODS = ("gohsp", "magnitude", "taylor", "random")
EDGE_STATISTICS = ("output", "attention")


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


@dataclass
class PruningConfig:
    """How to prune: the method, the budget, the ranking, the ADMM schedule and the distillation.

    Exactly one budget is set: ``target_sparsity`` (fraction of all parameters removed) or
    ``target_flops_reduction`` (fraction of forward FLOPs removed). The compacted model hits it
    to within one unit's cost (0.5% in practice).
    """

    method: str = field(default="gohsp", **_help(f"Importance criterion: one of {', '.join(METHODS)}."))
    target_sparsity: float | None = field(
        default=None, **_help("Fraction of the model's parameters to remove, in (0, 1), e.g. 0.4.")
    )
    target_flops_reduction: float | None = field(
        default=None, **_help("Fraction of forward FLOPs per image to remove, in (0, 1); instead of target_sparsity.")
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
        default=256, **_help("Training images run through the dense model to rank heads (gohsp) or to take gradients (taylor).")
    )
    edge_statistic: str = field(
        default="output",
        **_help("Graph edge weight between heads of consecutive layers: 'output' (|corr| of their contributions "
                "to the residual stream) or 'attention' (|corr| of their attention maps)."),
    )
    damping: float = field(default=0.85, **_help("Markov-chain damping (PageRank style); 1 - damping teleports."))
    ranking_tolerance: float = field(default=1e-8, **_help("Power-iteration tolerance for the stationary distribution."))
    ranking_max_iterations: int = field(default=1000, **_help("Power-iteration limit; not converging is an error."))
    importance_alpha: float = field(
        default=1.0, **_help("Weight of the graph importance in the head score: importance**alpha * normalised norm.")
    )
    admm_rho: float = field(default=1e-3, **_help("Initial ADMM penalty weight rho."))
    admm_rho_growth: float = field(default=1.3, **_help("rho is multiplied by this at every Z/U update."))
    admm_rho_final: float | None = field(
        default=None,
        **_help("If set, rho grows geometrically from admm_rho to this value at the ADMM phase's last Z/U update, "
                "whatever the phase's length (admm_rho_growth is then ignored). Use it for short runs, where a "
                "fixed growth leaves rho too small for W to reach the sparse support before the hard prune."),
    )
    admm_update_steps: int = field(default=20, **_help("Optimizer steps between ADMM Z/U updates."))
    admm_fraction: float = field(
        default=0.5, **_help("Share of the training steps spent in ADMM; the rest fine-tunes the compacted model.")
    )
    distillation_weight: float = field(
        default=0.5, **_help("Weight of the distillation loss from the frozen dense model during fine-tuning; 0 disables it.")
    )
    distillation_temperature: float = field(default=2.0, **_help("Softmax temperature of the distillation loss."))
    use_distillation_token: bool = field(
        default=True, **_help("For DeiT with a distillation head, distil through that head (DeiT-style).")
    )
    random_seed: int = field(default=0, **_help("Seed of the random baseline's scores (identical on every process)."))

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"PruningConfig.method={self.method!r} is unknown; choose one of {', '.join(METHODS)}.")
        budgets = {"target_sparsity": self.target_sparsity, "target_flops_reduction": self.target_flops_reduction}
        given = {name: value for name, value in budgets.items() if value is not None}
        if len(given) != 1:
            raise ValueError(
                "Set exactly one budget: target_sparsity (fraction of parameters to remove) or "
                f"target_flops_reduction (fraction of FLOPs to remove); got {given or 'neither'}."
            )
        for name, value in given.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1):
                raise ValueError(f"PruningConfig.{name}={value!r} must lie strictly between 0 and 1, e.g. 0.4.")
        if not (self.prune_heads or self.prune_neurons):
            raise ValueError("PruningConfig prunes nothing: set prune_heads or prune_neurons to True.")
        if self.edge_statistic not in EDGE_STATISTICS:
            raise ValueError(
                f"PruningConfig.edge_statistic={self.edge_statistic!r} is unknown; choose {' or '.join(EDGE_STATISTICS)}."
            )
        for name in ("min_heads_per_layer", "min_neurons_per_layer"):
            if getattr(self, name) < 0:
                raise ValueError(f"PruningConfig.{name}={getattr(self, name)} must be >= 0.")
        for name in ("round_heads_to", "round_neurons_to", "calibration_samples", "admm_update_steps",
                     "ranking_max_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"PruningConfig.{name}={getattr(self, name)} must be >= 1.")
        for name, low, high in (("damping", 0, 1), ("admm_fraction", 0, 1)):
            if not low < getattr(self, name) < high:
                raise ValueError(f"PruningConfig.{name}={getattr(self, name)} must lie strictly between {low} and {high}.")
        for name in ("admm_rho", "distillation_temperature", "ranking_tolerance"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PruningConfig.{name}={getattr(self, name)} must be > 0.")
        if self.admm_rho_growth < 1:
            raise ValueError(f"PruningConfig.admm_rho_growth={self.admm_rho_growth} must be >= 1 (rho never shrinks).")
        if self.admm_rho_final is not None and not self.admm_rho_final >= self.admm_rho:
            raise ValueError(
                f"PruningConfig.admm_rho_final={self.admm_rho_final} must be >= admm_rho={self.admm_rho} "
                f"(rho never shrinks); leave it unset to grow by admm_rho_growth."
            )
        if not 0 <= self.distillation_weight <= 1:
            raise ValueError(f"PruningConfig.distillation_weight={self.distillation_weight} must lie in [0, 1].")
        if self.importance_alpha < 0:
            raise ValueError(f"PruningConfig.importance_alpha={self.importance_alpha} must be >= 0.")

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> PruningConfig:
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
        return cls.from_dict(json.loads(path.read_text()))
