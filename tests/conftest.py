"""Shared fixtures: tiny random models of every supported architecture, plans, and reference outputs.

Every model is built from a config (no network) and its weights are perturbed with seeded noise,
because transformers' initialisation zeroes many biases and BEiT's relative position tables,
which would hide indexing bugs in the surgery. The reference for a pruned model is computed
here independently of hf_vitprune: the original model with the o_proj input columns of removed
heads and the MLP output-projection input columns of removed neurons set to zero.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import (
    BeitConfig,
    TrainerCallback,
    BeitForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
    ViTMSNConfig,
    ViTMSNForImageClassification,
)

import hf_vitprune  # registers the pruned Auto classes

# The models are tiny: one thread is fastest, and avoids OpenMP spin-waiting that makes every op
# ~100x slower when the machine's cores are shared (pytest -n 2, other jobs).
torch.set_num_threads(1)

COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=4)
LABELS = ["cat", "dog", "fox", "owl", "yak"]
CLASSIFIER = dict(
    num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
)


def _vit(cls, config_cls=ViTConfig, classifier=True, **extra):
    return lambda: cls(config_cls(intermediate_size=37, **COMMON, **(CLASSIFIER if classifier else {}), **extra))


# name -> builder of a fresh model with HF's initialisation. Backbones (no logits) are
# ViTModel and DeiTModel; everything else is an image classifier.
ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "vit_model": _vit(ViTModel, classifier=False),
    "vit": _vit(ViTForImageClassification),
    "deit_model": _vit(DeiTModel, DeiTConfig, classifier=False),
    "deit": _vit(DeiTForImageClassification, DeiTConfig),
    "deit_teacher": _vit(DeiTForImageClassificationWithTeacher, DeiTConfig),
    "vit_msn": _vit(ViTMSNForImageClassification, ViTMSNConfig),
    # per-layer relative position bias, layer scale, CLS pooling
    "beit_layer_bias": _vit(
        BeitForImageClassification,
        BeitConfig,
        use_relative_position_bias=True,
        use_mean_pooling=False,
        layer_scale_init_value=0.1,
    ),
    # one relative position bias table shared by all layers, mean pooling
    "beit_shared_bias": _vit(
        BeitForImageClassification, BeitConfig, use_shared_relative_position_bias=True, use_mask_token=False
    ),
    # both at once: apply_plan must add the shared table to each layer's own
    "beit_both_bias": _vit(
        BeitForImageClassification,
        BeitConfig,
        use_shared_relative_position_bias=True,
        use_relative_position_bias=True,
    ),
    # Dinov2 configs are strict: the MLP width comes from an integer mlp_ratio (layer scale by default)
    "dinov2": lambda: Dinov2ForImageClassification(Dinov2Config(mlp_ratio=2, **COMMON, **CLASSIFIER)),
    "dinov2_swiglu": lambda: Dinov2ForImageClassification(
        Dinov2Config(mlp_ratio=2, use_swiglu_ffn=True, **COMMON, **CLASSIFIER)
    ),
}
BACKBONES = {"vit_model", "deit_model"}


def build_model(name: str, seed: int = 0, noise: float = 0.1) -> nn.Module:
    """A fresh eval-mode ``name`` model whose every parameter got seeded Gaussian noise."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]()
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    return model.eval()


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder layers (modules with ``attention`` and ``mlp``), found without hf_vitprune."""
    return [m for m in model.modules() if isinstance(getattr(m, "mlp", None), nn.Module) and hasattr(m, "attention")]


def mlp_out(layer: nn.Module) -> nn.Linear:
    return layer.mlp.down_proj if hasattr(layer.mlp, "down_proj") else layer.mlp.fc2


def widths(model: nn.Module) -> list[tuple[int, int]]:
    """(heads, neurons) of every encoder layer, read off the module shapes."""
    result = []
    for layer in encoder_layers(model):
        o_proj = layer.attention.o_proj
        result.append((o_proj.in_features // layer.attention.head_dim, mlp_out(layer).in_features))
    return result


def zeroed_reference(model: nn.Module, plan: hf_vitprune.PruningPlan) -> nn.Module:
    """A copy of ``model`` whose removed heads / neurons have their output columns set to zero."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for index, layer in enumerate(encoder_layers(reference)):
            o_proj, head_dim = layer.attention.o_proj, layer.attention.head_dim
            heads = o_proj.in_features // head_dim
            for head in set(range(heads)) - set(plan.heads.get(index, range(heads))):
                o_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
            out = mlp_out(layer)
            neurons = set(range(out.in_features)) - set(plan.neurons.get(index, range(out.in_features)))
            out.weight[:, sorted(neurons)] = 0
    return reference


def outputs(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor the model returns (logits, cls/distillation logits, hidden states, pooler output)."""
    with torch.no_grad():
        result = model(pixel_values=pixel_values)
    tensors = {k: v for k, v in result.items() if isinstance(v, torch.Tensor)}
    assert tensors, "the model returned no tensors"
    return tensors


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def random_plan(model: nn.Module, seed: int) -> hf_vitprune.PruningPlan:
    """A seeded heterogeneous plan: layer 0 keeps exactly one head, layer 1 exactly one neuron.

    Index lists come unsorted (the plan must not care) and the last layer is sometimes left out
    of ``heads`` (keeps all its heads).
    """
    rng = random.Random(seed)
    layer_widths = widths(model)
    assert len(layer_widths) >= 3
    heads, neurons = {}, {}
    for index, (num_heads, num_neurons) in enumerate(layer_widths):
        keep_heads = 1 if index == 0 else rng.randint(max(1, num_heads - 2), max(1, num_heads - 1))
        keep_neurons = 1 if index == 1 else rng.randint(2, max(2, num_neurons - 3))
        if not (index == len(layer_widths) - 1 and rng.random() < 0.5):
            heads[index] = rng.sample(range(num_heads), keep_heads)
        neurons[index] = rng.sample(range(num_neurons), keep_neurons)
    return hf_vitprune.PruningPlan(heads=heads, neurons=neurons)


class SimulatedCrash(TrainerCallback):
    """Simulates a killed job: raises after the given step of the given phase (after its checkpoint)."""

    def __init__(self, trainer, phase, step):
        self.trainer, self.phase, self.step = trainer, phase, step
        self.first = None  # the run's step count goes on across phases: count this phase's own steps

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.phase != self.phase:
            return
        self.first = state.global_step if self.first is None else self.first
        if state.global_step - self.first + 1 == self.step + 1:
            raise KeyboardInterrupt("simulated crash")


def uninterrupted_and_resumed(make_trainer, directory, phase: str, crash: int):
    """(a run trained straight through in ``directory/reference``, the same run killed after step ``crash`` of
    ``phase`` in ``directory/resumed`` and resumed from its newest checkpoint). ``make_trainer(output_dir)``
    builds a fresh trainer (model, arguments, data and config alike each time)."""
    reference = make_trainer(directory / "reference")
    reference.train()
    crashed = make_trainer(directory / "resumed")
    crashed.add_callback(SimulatedCrash(crashed, phase, crash))
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = make_trainer(directory / "resumed")
    resumed.train(resume_from_checkpoint=True)
    return reference, resumed


def assert_same_weights(got: nn.Module, expected: nn.Module) -> None:
    """Bit-identical state dicts, key for key."""
    expected_state, got_state = expected.state_dict(), got.state_dict()
    assert expected_state.keys() == got_state.keys()
    for name in expected_state:
        torch.testing.assert_close(got_state[name], expected_state[name], rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=list(ARCHITECTURES))
def arch(request) -> str:
    """The name of one supported architecture; tests using it run once per architecture."""
    return request.param


@pytest.fixture
def model(arch) -> nn.Module:
    """A fresh, perturbed, eval-mode tiny model of ``arch``."""
    return build_model(arch)


@pytest.fixture
def make_model() -> Callable[..., nn.Module]:
    """``make_model(name, seed=0)``: build another perturbed tiny model by architecture name."""
    return build_model


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(123))


@pytest.fixture
def helpers():
    """Reference helpers that do not depend on hf_vitprune's own layer discovery."""

    class Helpers:
        encoder_layers = staticmethod(encoder_layers)
        mlp_out = staticmethod(mlp_out)
        widths = staticmethod(widths)
        zeroed_reference = staticmethod(zeroed_reference)
        outputs = staticmethod(outputs)
        max_abs_diff = staticmethod(max_abs_diff)
        random_plan = staticmethod(random_plan)
        architectures = ARCHITECTURES
        backbones = BACKBONES
        labels = LABELS

    return Helpers
