"""Head dims and the embedding width: the two unit kinds that narrow layers rather than remove whole units.

The reference for a compacted model is built here without hf_vitprune's surgery: the original
model with the dropped head-dim channels' q/k/v rows zeroed in every head (attention keeps the
dense scaling), and every residual LayerNorm replaced by one that normalises over the kept
embedding channels and outputs zeros elsewhere.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, AutoModelForImageClassification

import hf_vitprune
from hf_vitprune import PruningPlan, apply_plan, attach_masks, model_stats

from conftest import BACKBONES, build_model, encoder_layers


class KeptChannelsLayerNorm(nn.Module):
    """LayerNorm over ``kept`` channels of the last dimension; zeros in the others."""

    def __init__(self, norm: nn.LayerNorm, kept: list[int]):
        super().__init__()
        self.norm, self.kept = norm, torch.tensor(kept)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        part = hidden[..., self.kept]
        out[..., self.kept] = nn.functional.layer_norm(
            part, (len(self.kept),), self.norm.weight[self.kept], self.norm.bias[self.kept], self.norm.eps
        )
        return out


def reference(model: nn.Module, plan: PruningPlan) -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for index, layer in enumerate(encoder_layers(ref)):
            attention = layer.attention
            d = attention.head_dim
            heads = attention.o_proj.in_features // d
            dropped_heads = set(range(heads)) - set(plan.heads.get(index, range(heads)))
            dropped_dims = set(range(d)) - set(plan.other_units.get("head_dims", {}).get(index, range(d)))
            rows = [h * d + c for h in range(heads) for c in range(d) if h in dropped_heads or c in dropped_dims]
            for name in ("q_proj", "k_proj", "v_proj"):
                linear = getattr(attention, name)
                linear.weight[rows] = 0
                if linear.bias is not None:
                    linear.bias[rows] = 0
            out = layer.mlp.down_proj if hasattr(layer.mlp, "down_proj") else layer.mlp.fc2
            dropped = set(range(out.in_features)) - set(plan.neurons.get(index, range(out.in_features)))
            out.weight[:, sorted(dropped)] = 0
    if plan.embedding is not None:
        width = model.config.hidden_size
        for parent in list(ref.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.LayerNorm) and tuple(child.normalized_shape) == (width,):
                    setattr(parent, name, KeptChannelsLayerNorm(child, plan.embedding))
    return ref


def width_plan(model: nn.Module, seed: int, embedding: bool = True) -> PruningPlan:
    rng = random.Random(seed)
    layers = encoder_layers(model)
    heads, neurons, dims = {}, {}, {}
    for index, layer in enumerate(layers):
        d = layer.attention.head_dim
        num_heads = layer.attention.o_proj.in_features // d
        out = layer.mlp.down_proj if hasattr(layer.mlp, "down_proj") else layer.mlp.fc2
        heads[index] = rng.sample(range(num_heads), rng.randint(1, num_heads))
        neurons[index] = rng.sample(range(out.in_features), rng.randint(2, out.in_features))
        if index != 1:  # one layer keeps its full head dim
            dims[index] = rng.sample(range(d), rng.randint(2, d - 1))
    width = model.config.hidden_size
    kept = rng.sample(range(width), rng.randint(width // 2, width - 3)) if embedding else None
    return PruningPlan(heads=heads, neurons=neurons, other_units={"head_dims": dims}, embedding=kept)


def compare(arch: str, got, want, kept: list[int] | None) -> float:
    if arch in BACKBONES:
        hidden_got, hidden_want = got.last_hidden_state, want.last_hidden_state
        if kept is not None:
            hidden_want = hidden_want[..., kept]
        diffs = [(hidden_got - hidden_want).abs().max(), (got.pooler_output - want.pooler_output).abs().max()]
        return max(float(d) for d in diffs)
    return float((got.logits - want.logits).abs().max())


@pytest.mark.parametrize("seed", [0, 1])
def test_compacted_equals_reference(arch, pixel_values, seed):
    model = build_model(arch, seed=seed)
    plan = width_plan(model, seed)
    with torch.no_grad():
        want = reference(model, plan)(pixel_values=pixel_values)
        pruned = apply_plan(copy.deepcopy(model), plan)
        got = pruned(pixel_values=pixel_values)
    assert compare(arch, got, want, plan.embedding) < 1e-5
    assert pruned.config.hidden_size == len(plan.embedding)
    assert [layer.attention.head_dim for layer in encoder_layers(pruned)] == [
        len(plan.other_units["head_dims"].get(i, range(model.config.hidden_size // 4))) for i in range(3)
    ]


def test_masks_equal_compaction(arch, pixel_values):
    """attach_masks with the plan (gated LayerNorms, gated q/k/v) gives the compacted model's outputs."""
    model = build_model(arch, seed=3)
    plan = width_plan(model, 3)
    with torch.no_grad():
        pruned = apply_plan(copy.deepcopy(model), plan)
        got = pruned(pixel_values=pixel_values)
        with attach_masks(model, plan):
            want = model(pixel_values=pixel_values)
    assert compare(arch, got, want, plan.embedding) < 1e-5


def test_save_reload_identical(arch, pixel_values, tmp_path):
    model = build_model(arch, seed=4)
    plan = width_plan(model, 4)
    pruned = apply_plan(model, plan)
    pruned.save_pretrained(tmp_path)
    auto = AutoModel if arch in BACKBONES else AutoModelForImageClassification
    with torch.no_grad():
        want = pruned(pixel_values=pixel_values)
        for kwargs in ({}, {"trust_remote_code": True}):
            reloaded = auto.from_pretrained(tmp_path, **kwargs).eval()
            got = reloaded(pixel_values=pixel_values)
            assert compare(arch, got, want, None) == 0.0
            assert type(reloaded).__name__ == type(pruned).__name__


def test_stats_exact(arch):
    """model_stats counts narrowed models exactly, and predicts them from the plan on the original."""
    model = build_model(arch, seed=5)
    plan = width_plan(model, 5)
    predicted = model_stats(model, plan)
    pruned = apply_plan(model, plan)
    stats = model_stats(pruned)
    assert stats.params == sum(p.numel() for p in pruned.parameters())
    assert predicted.params == stats.params and predicted.flops == stats.flops
    pruned.config._attn_implementation = "eager"
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        pruned(pixel_values=torch.randn(1, 3, 16, 16))
    assert stats.flops == counter.get_total_flops()
    dims = plan.other_units["head_dims"]
    assert [layer.other_units["head_dims"] for layer in stats.layers] == [len(dims[0]), 8, len(dims[2])]


def test_head_dims_alone_keep_width(pixel_values):
    """Narrowing head dims only: hidden_size unchanged, per_layer_config records head_dim, scaling is the dense one."""
    model = build_model("vit", seed=6)
    plan = width_plan(model, 6, embedding=False)
    scaling = encoder_layers(model)[0].attention.scaling
    pruned = apply_plan(model, plan)
    assert pruned.config.hidden_size == 32
    assert hf_vitprune.modeling.dense_view(pruned.config).head_dim == 8  # the width layers are built at
    assert pruned.config.per_layer_config[0].head_dim == len(plan.other_units["head_dims"][0])
    assert all(layer.attention.scaling == scaling for layer in encoder_layers(pruned))


def test_plain_plans_record_no_head_dim():
    """A heads/neurons plan leaves config.json as before: no per-layer head_dim, none in the statistics."""
    model = build_model("vit", seed=7)
    pruned = apply_plan(model, PruningPlan(heads={0: [0, 1]}, neurons={1: [0, 1, 2]}))
    assert "head_dim" not in pruned.config.to_dict()["per_layer_config"]["0"]
    assert all("head_dims" not in layer.other_units for layer in model_stats(pruned).layers)


@pytest.mark.parametrize(
    "embedding, message",
    [([], "keeps no channel"), ([0, 40], "embedding width is 32"), ([1, 1], "more than once")],
)
def test_bad_embedding_plans(embedding, message):
    model = build_model("vit")
    with pytest.raises(ValueError, match=message):
        apply_plan(model, PruningPlan(embedding=embedding))


def test_plan_json_round_trip():
    plan = PruningPlan(heads={0: [1]}, other_units={"head_dims": {0: [0, 2]}}, embedding=[3, 1, 2])
    again = PruningPlan.from_json_string(plan.to_json_string())
    assert again == plan and again.embedding == [1, 2, 3]
    assert "embedding" not in PruningPlan(heads={0: [1]}).to_dict()


def test_budget_refuses_head_dim_scores():
    """Head dims cut across heads: their cost is not additive, so select_plan must not pick them."""
    model = build_model("vit")
    scores = {"head_dims": [torch.rand(8) for _ in range(3)]}
    with pytest.raises(ValueError, match="'head_dims' cannot be selected by a budget"):
        hf_vitprune.select_plan(model, target_sparsity=0.3, scores=scores,
                                head_scores=[torch.rand(4)] * 3, neuron_scores=[torch.rand(37)] * 3)


@pytest.mark.parametrize("arch", ["vit", "dinov2_swiglu", "beit_shared_bias"])
@pytest.mark.parametrize("remote", [False, True], ids=["installed", "remote-code"])
def test_narrowed_models_run_in_pipeline(arch, remote, tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor, pipeline

    model = build_model(arch, seed=8)
    pruned = apply_plan(model, width_plan(model, 8))
    pruned.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(20, 24, 3), dtype=np.uint8))
    classifier = pipeline("image-classification", model=str(tmp_path), trust_remote_code=remote)
    predictions = classifier(image, top_k=5)
    inputs = ViTImageProcessor(size={"height": 16, "width": 16})(images=image, return_tensors="pt")
    with torch.no_grad():
        probabilities = pruned(**inputs).logits[0].softmax(-1)
    top = int(probabilities.argmax())
    assert predictions[0]["label"] == pruned.config.id2label[top]
    assert predictions[0]["score"] == pytest.approx(float(probabilities[top]), abs=1e-5)
