"""SPViT attention-to-convolution: the single path equals the dense model or the converted one, the shared 3x3
kernel equals an independent convolution, hybrids save/reload/export with exact costs, the budget on digits,
resume, two processes, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessor, pipeline

from conftest import assert_same_weights, uninterrupted_and_resumed
from hf_vitprune import (
    PruningConfig,
    PruningPlan,
    PruningTrainer,
    add_token_pruning,
    apply_plan,
    attach_masks,
    convert_attention,
    model_stats,
)
from hf_vitprune.architectures import find_encoder_layers
from hf_vitprune.budget import Budget, select_plan
from hf_vitprune.cli import main as cli_main
from hf_vitprune.convolution import ConvMixer, shared_conv_weights
from hf_vitprune.methods import SearchContext, SPViTConv
from test_ofb import digits, digits_vit, ofb_args
from test_save_reload import outputs_without_hf_vitprune
from test_stats import counted_flops

SCRIPTS = Path(__file__).parent / "scripts"
CONV_ARCHITECTURES = ["vit", "deit_teacher", "vit_msn", "dinov2", "beit_shared_bias"]


def logits_of(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


def conv_config(**overrides) -> PruningConfig:
    values = dict(method="spvit_conv", target_flops_reduction=0.3, calibration_samples=32)
    values.update(overrides)
    return PruningConfig(**values)


def searching(model, config) -> SPViTConv:
    method = SPViTConv(config)
    method.setup(SearchContext(model=model, budget=config.budget, search_steps=10,
                               calibration_batches=lambda: iter(()), seed=0))
    return method


def randomise(method, seed):
    """Random head-to-tap mixings and BatchNorm states, so that weight sharing and copying are exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for state in method.search:
            state.mixing.copy_(torch.randn(state.mixing.shape, generator=generator) * 0.02)
            for norm in state.norms.values():
                for tensor in (norm.weight, norm.bias, norm.running_mean):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
                norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=generator) + 0.5)


@pytest.mark.parametrize("arch", CONV_ARCHITECTURES)
def test_the_search_model_at_attention_equals_the_dense_model(make_model, pixel_values, arch):
    dense = make_model(arch)
    for options in ({}, {"layer_types": {0: "attention", 1: "attention", 2: "attention"}}):
        model = make_model(arch)
        method = searching(model, conv_config(target_flops_reduction=0.1, **options))
        randomise(method, 1)
        # the gates start above their thresholds: every layer is its attention with all its neurons
        torch.testing.assert_close(logits_of(model.eval(), pixel_values), logits_of(dense, pixel_values),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", CONV_ARCHITECTURES)
def test_a_layer_forced_to_a_convolution_gives_the_converted_models_logits(make_model, pixel_values, arch):
    model = make_model(arch)
    # a budget the two convolutions meet alone: the plan only drops the neurons whose gates closed
    method = searching(model, conv_config(target_flops_reduction=0.01, layer_types={0: "conv3x3", 1: "conv1x1"}))
    randomise(method, 2)
    with torch.no_grad():  # one neuron gate closed: the converted model's plan drops it
        method.search[2].neuron_gates[5] = -1.0
    searched = logits_of(model.eval(), pixel_values)
    assert not torch.allclose(searched, logits_of(make_model(arch), pixel_values), atol=1e-3)
    plan = method.finalize(model)
    assert [layer.is_convolution for layer in find_encoder_layers(model)] == [True, True, False]
    assert [type(layer.attention) for layer in find_encoder_layers(model)][:2] == [ConvMixer, ConvMixer]
    neurons = model_stats(model).layers[2].neurons
    assert plan.neurons[2] == [n for n in range(neurons) if n != 5] and plan.neurons[0] == list(range(neurons))
    apply_plan(model, plan)
    torch.testing.assert_close(logits_of(model.eval(), pixel_values), searched, rtol=0, atol=1e-5)


def test_the_shared_3x3_kernel_equals_an_independent_convolution(make_model):
    model = make_model("vit")
    attention = find_encoder_layers(model)[0].attention
    heads, head_dim, width = 4, 8, 32
    generator = torch.Generator().manual_seed(3)
    mixing = torch.softmax(torch.randn(heads, 9, generator=generator), dim=0)
    kernel, bias, projection, out_bias = shared_conv_weights(attention, mixing, 3)
    mixer = ConvMixer(width, head_dim, 3, (4, 4), special=1).eval()
    with torch.no_grad():
        mixer.conv.weight.copy_(kernel)
        mixer.conv.bias.copy_(bias)
        mixer.o_proj.weight.copy_(projection)
        mixer.o_proj.bias.copy_(out_bias)
    hidden = torch.randn(2, 17, width, generator=generator)
    got, _ = mixer(hidden)

    # the reference: per patch, per tap (row offset, column offset), per head, the head's value projection of the
    # neighbour (zero outside the grid) weighted by the mixing; then BatchNorm (fresh: identity up to eps), ReLU, and
    # every head's output columns weighted by its mixing summed over the taps
    v_weight, v_bias = attention.v_proj.weight.detach(), attention.v_proj.bias.detach()
    o_weight, o_bias = attention.o_proj.weight.detach(), attention.o_proj.bias.detach()
    grid = hidden[:, 1:].reshape(2, 4, 4, width)
    expected = torch.zeros(2, 17, width)
    expected[:, 0] = hidden[:, 0]  # the class token bypasses the convolution
    for b in range(2):
        for row in range(4):
            for column in range(4):
                features = torch.zeros(head_dim)
                for tap in range(9):
                    dy, dx = tap // 3 - 1, tap % 3 - 1
                    for h in range(heads):
                        rows = slice(h * head_dim, (h + 1) * head_dim)
                        features += mixing[h, tap] * v_bias[rows]
                        if 0 <= row + dy < 4 and 0 <= column + dx < 4:
                            features += mixing[h, tap] * (v_weight[rows] @ grid[b, row + dy, column + dx])
                features = torch.relu(features / (1 + 1e-5) ** 0.5)
                out = o_bias.clone()
                for h in range(heads):
                    out += mixing[h].sum() * (o_weight[:, h * head_dim:(h + 1) * head_dim] @ features)
                expected[b, 1 + 4 * row + column] = out
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", CONV_ARCHITECTURES)
def test_costs_of_a_hybrid_model_equal_the_flop_counter_and_parameter_count(make_model, helpers, arch):
    model = make_model(arch)
    apply_plan(model, helpers.random_plan(model, 4))  # structurally pruned first (convolutions of fewer heads)
    convert_attention(model, {0: "conv3x3", 2: "conv1x1"})
    apply_plan(model, PruningPlan(neurons={0: [1, 2, 3], 2: [0]}))  # then a hybrid's neurons
    stats = model_stats(model.eval())
    assert stats.flops == counted_flops(model)
    assert stats.params == sum(p.numel() for p in model.parameters())
    assert [layer.layer_type for layer in stats.layers] == ["conv3x3", "attention", "conv1x1"]
    assert stats.layers[0].heads == 0 and stats.layers[0].to_dict()["layer_type"] == "conv3x3"


def test_save_reload_pipeline_export_and_remote_code(make_model, helpers, tmp_path, pixel_values):
    cases = {"vit": convert_attention(make_model("vit", seed=2), {0: "conv3x3", 1: "conv1x1"}),
             "deit_teacher": convert_attention(make_model("deit_teacher", seed=2), {2: "conv3x3"})}
    jobs, expected = [], {}
    for case, model in cases.items():
        model.eval().save_pretrained(tmp_path / case)
        config = json.loads((tmp_path / case / "config.json").read_text())
        assert {layer: record["layer_type"] for layer, record in config["per_layer_config"].items()} == {
            str(layer.index): layer.attention.layer_type if layer.is_convolution else "attention"
            for layer in find_encoder_layers(model)}
        reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / case).eval()
        torch.testing.assert_close(logits_of(reloaded, pixel_values), logits_of(model, pixel_values), rtol=0, atol=0)
        jobs.append((case, str(tmp_path / case), "AutoModelForImageClassification"))
        expected.update({f"{case}/{k}": v for k, v in helpers.outputs(model, pixel_values).items()})
    assert (tmp_path / "vit" / "convolution.py").is_file()  # the remote code the config's auto_map points at

    model = cases["vit"]
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(24, 20, 3), dtype=np.uint8))
    predictions = pipeline("image-classification", model=str(tmp_path / "vit"))(image)
    inputs = AutoImageProcessor.from_pretrained(tmp_path / "vit")(images=image, return_tensors="pt")
    assert predictions[0]["label"] == model.config.id2label[int(logits_of(model, inputs["pixel_values"])[0].argmax())]

    exported = torch.export.export(model, (), {"pixel_values": pixel_values})
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(pixel_values=pixel_values).logits,
                                   logits_of(model, pixel_values), rtol=1e-5, atol=1e-6)

    got, _ = outputs_without_hf_vitprune(tmp_path, jobs, pixel_values)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def train(directory, config=None, **arguments):
    trainer = PruningTrainer(model=digits_vit(), args=ofb_args(directory, **{"learning_rate": 2e-3, **arguments}),
                             train_dataset=digits(), pruning_config=config or conv_config())
    trainer.train()
    return trainer


@pytest.mark.parametrize("gate_heads", [False, True], ids=["neurons", "heads_too"])
@pytest.mark.parametrize("theta", [0.5, -1.0])
def test_the_cost_term_sees_the_expected_cost_under_the_gates_probabilities(make_model, theta, gate_heads):
    """Each gate counts with probability sigmoid(theta), the attention gate chained behind the 3x3 one, so the cost
    moves with every threshold; the paper's thresholded cost moves only when one crosses zero. A head saves its cost
    only while its layer stays attention."""
    model = make_model("vit")
    method = searching(model, conv_config(target_flops_reduction=0.3, gate_heads=gate_heads))
    with torch.no_grad():
        for state in method.search:
            for gates in (state.kernel_gates, state.neuron_gates, state.head_gates):
                gates.fill_(theta)
    on = torch.sigmoid(torch.tensor(theta, dtype=torch.float64))
    c, layers = method.costs, find_encoder_layers(model)
    every_neuron = sum(layer.num_neurons * cost for layer, cost in zip(layers, c["neuron"]))
    every_head = sum(layer.num_heads * cost for layer, cost in zip(layers, c["head"])) if gate_heads else 0.0
    conv3x3, conv1x1 = (sum(change[kind] for change in c["deltas"]) for kind in ("conv3x3", "conv1x1"))
    want = (c["dense"] + on * (1 - on * on) * conv3x3 + (1 - on) * (1 - on * on) * conv1x1 - (1 - on) * every_neuron
            - on * on * (1 - on) * every_head)
    cost = method._cost_estimate()
    assert float(cost.detach()) == pytest.approx(float(want), rel=1e-9)
    cost.backward()
    assert all(bool((state.neuron_gates.grad != 0).all()) for state in method.search)
    assert all((state.head_gates.grad is not None and bool((state.head_gates.grad != 0).all())) == gate_heads
               for state in method.search)
    method.options.cost_estimate = "thresholded"  # the paper's: the thresholds alone decide
    thresholded = c["dense"] if theta > 0 else c["dense"] + conv1x1 - every_neuron
    assert float(method._cost_estimate()) == pytest.approx(thresholded, rel=1e-9)


@pytest.mark.parametrize("target", [{"target_flops_reduction": 0.4}, {"target_sparsity": 0.3}], ids=str)
def test_the_budget_is_met_within_two_percent_on_digits(tmp_path, target, capsys):
    """The paper's thresholded cost at a fast architecture rate converts layers on digits: the conversion path end to
    end (the default expected cost is checked below)."""
    config = conv_config(**{"target_flops_reduction": None, "arch_learning_rate": 0.2, "search_fraction": 0.5,
                            "cost_estimate": "thresholded", **target})
    trainer = train(tmp_path, config=config, max_steps=40, logging_steps=4)
    budget = config.budget
    kept = budget.measure(model_stats(trainer.model)) / budget.measure(trainer.dense_stats)
    assert 1 - budget.fraction - 0.02 <= kept <= 1 - budget.fraction, kept
    types = trainer.method.types
    assert types.count("attention") >= 1 and len(types) == 4
    assert [layer.layer_type or "attention" for layer in model_stats(trainer.model).layers] == types
    trainer.save_model()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    images = digits()[:4]["pixel_values"]
    torch.testing.assert_close(logits_of(reloaded, images), logits_of(trainer.model.eval(), images), rtol=0, atol=0)
    report = json.loads((tmp_path / "pruning_report.json").read_text())
    assert report["method_card"]["details"]["layer_map"] == types
    card = (tmp_path / "README.md").read_text()
    assert "he2024pruning" in card and "Layer map: " + ", ".join(f"{i}: {t}" for i, t in enumerate(types)) in card
    assert all(f"| {i} | {t} | " in card for i, t in enumerate(types))  # the layer table's Type column
    converted = [str(i) for i, t in enumerate(types) if t != "attention"]
    assert converted, "the search turned no layer into a convolution"
    assert f"{', '.join(converted)} became a convolution over the patch grid" in card
    assert ("Pruned units: attention layers turned into convolutions, heads and all (at least 1 stays attention) and "
            "MLP neurons (at least 1 per layer).") in card  # not the config's "attention heads (at least 1 per layer"
    capsys.readouterr()  # the training's logs
    assert cli_main(["report", str(tmp_path), "--no-speed"]) == 0  # the report's layer table shows the types
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split()[:2] == ["layer", "type"]
    assert [line.split()[1] for line in lines[5:9]] == types


@pytest.mark.parametrize("gate_heads", [False, True], ids=["neurons", "heads_too"])
@pytest.mark.parametrize("target", [0.4, 0.6])
def test_the_default_search_meets_the_budget_on_digits(tmp_path, target, gate_heads):
    config = conv_config(target_flops_reduction=target, gate_heads=gate_heads)
    trainer = train(tmp_path, config=config, max_steps=40, logging_steps=10)
    kept = model_stats(trainer.model).flops / trainer.dense_stats.flops
    assert 1 - target - 0.02 <= kept <= 1 - target, kept
    types = trainer.method.types
    assert [layer.layer_type or "attention" for layer in model_stats(trainer.model).layers] == types
    assert types.count("attention") >= 1
    heads = [layer.num_heads for layer, t in zip(find_encoder_layers(trainer.model), types) if t == "attention"]
    assert (min(heads) < 4) == gate_heads  # the digits ViT has 4 heads per layer
    if gate_heads:
        trainer.save_model()
        reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
        images = digits()[:4]["pixel_values"]
        torch.testing.assert_close(logits_of(reloaded, images), logits_of(trainer.model.eval(), images))
        card = (tmp_path / "README.md").read_text()
        assert "the heads of the other layers (at least 1 per layer) and MLP neurons" in card


def test_resume_mid_search_equals_the_uninterrupted_run(tmp_path):
    def make_trainer(directory):
        args = ofb_args(directory, save_strategy="steps", save_steps=3, max_steps=12)
        return PruningTrainer(model=digits_vit(), args=args, train_dataset=digits(),
                              pruning_config=conv_config(arch_learning_rate=0.2, search_fraction=0.5))

    reference, resumed = uninterrupted_and_resumed(make_trainer, tmp_path, "conv_search", crash=3)
    assert resumed.method.types == reference.method.types
    assert_same_weights(resumed.model, reference.model)


def test_two_processes_derive_the_same_layer_map(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPTS / "distributed_prune.py"), str(tmp_path), "spvit_conv"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert runs[0] == runs[1] and runs[0]["world_size"] == 2
    assert len(runs[0]["search_weights"]) == 5 and len(runs[0]["layer_types"]) == 3
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "model")
    assert [layer.layer_type or "attention" for layer in model_stats(reloaded).layers] == runs[0]["layer_types"]


def test_an_unreachable_budget_is_refused(tmp_path):
    trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path), train_dataset=digits(),
                             pruning_config=conv_config(target_flops_reduction=0.95))
    with pytest.raises(ValueError, match=r"the cheapest model spvit_conv can reach .* Ask for at most 0\.\d+"):
        trainer.train()
    assert not any(layer.is_convolution for layer in find_encoder_layers(trainer.model))


def test_a_model_whose_tokens_are_not_a_grid_is_refused(make_model):
    model = add_token_pruning(make_model("vit"), [0.5])
    with pytest.raises(ValueError, match="prunes tokens, so its later layers do not see a patch grid"):
        searching(model, conv_config())
    with pytest.raises(ValueError, match="prunes tokens, so its later layers do not see a patch grid"):
        convert_attention(model, {0: "conv3x3"})
    hybrid = convert_attention(make_model("vit"), {2: "conv3x3"})
    with pytest.raises(ValueError, match=r"Layers \[2\] are convolutions over the patch grid"):
        add_token_pruning(hybrid, [0.5], depths=[1])


@pytest.mark.parametrize("layer_types, message", [
    ({0: "conv5x5"}, r"layer type 'conv5x5' does not exist; the layer types are attention, conv1x1, conv3x3"),
    ({"first": "conv3x3"}, "keys are layer indices"),
    ('{"0": conv3x3}', "is not JSON"),
])
def test_bad_layer_types_name_the_problem(layer_types, message):
    with pytest.raises(ValueError, match=message):
        conv_config(layer_types=layer_types)


def test_bad_conversions_name_the_problem(make_model):
    with pytest.raises(ValueError, match="layer 7 does not exist; the model has layers 0 to 2"):
        convert_attention(make_model("vit"), {7: "conv3x3"})
    with pytest.raises(ValueError, match="layer type 'conv2x2' does not exist"):
        convert_attention(make_model("vit"), {0: "conv2x2"})
    with pytest.raises(ValueError, match=r"mixing\[0\] has shape \(4, 3\); layer 0 needs \(4, 9\)"):
        convert_attention(make_model("vit"), {0: "conv3x3"}, mixing={0: torch.ones(4, 3)})
    model = make_model("vit")
    with pytest.raises(ValueError, match=r"layer_types names layers \[5\]"):
        searching(model, conv_config(layer_types={5: "conv3x3"}))
    with pytest.raises(ValueError, match="min_attention_layers=4 asks for more attention layers"):
        searching(make_model("vit"), conv_config(min_attention_layers=4))
    with pytest.raises(ValueError, match="takes target_sparsity or target_flops_reduction"):
        conv_config(target_flops_reduction=None, target_latency_reduction=0.3)
    assert Budget("flops", 0.3) == conv_config().budget


def test_the_recipe_gives_each_method_its_own_defaults_of_shared_options(tmp_path):
    from hf_vitprune.recipe import parse_arguments

    # search_fraction and arch_learning_rate are options of several methods, one flag each
    for method, expected in (("spvit_conv", {"search_fraction": 0.3, "arch_learning_rate": 1e-2}),
                             ("spvit_tokens", {"search_fraction": 0.5})):
        *_, config, _ = parse_arguments(["--method", method, "--target_flops_reduction", "0.3",
                                         "--output_dir", str(tmp_path)])
        assert {key: getattr(config.method_options, key) for key in expected} == expected, method
    *_, config, _ = parse_arguments(["--method", "spvit_conv", "--target_flops_reduction", "0.3", "--layer_types",
                                     '{"0": "conv3x3"}', "--search_fraction", "0.2", "--output_dir", str(tmp_path)])
    assert config.method_options.layer_types == {0: "conv3x3"} and config.method_options.search_fraction == 0.2


def test_a_hybrid_model_is_masked_and_pruned_further_like_any_other(make_model, pixel_values):
    model = convert_attention(make_model("vit"), {0: "conv3x3"})
    generator = torch.Generator().manual_seed(5)
    scores = [torch.rand(n, generator=generator) for n in (0, 4, 4)], [torch.rand(37, generator=generator)] * 3
    plan = select_plan(model, *scores, target_flops_reduction=0.3)
    assert plan.heads[0] == []  # the convolution layer has no heads to keep
    with attach_masks(model, plan):
        masked = logits_of(model, pixel_values)
    apply_plan(model, plan)
    torch.testing.assert_close(logits_of(model, pixel_values), masked, rtol=0, atol=1e-5)
    assert find_encoder_layers(model)[0].is_convolution and model_stats(model).layers[0].layer_type == "conv3x3"


@pytest.mark.parametrize("name, collapses", [("vit", True), ("deit", True), ("beit_shared_bias", False),
                                             ("dinov2", False)])
def test_a_search_that_could_convert_every_layer_of_a_class_token_classifier_is_refused(make_model, name, collapses):
    """With min_attention_layers=0 the search may end with no attention layer; a classifier that reads only the
    class token (which bypasses convolutions) would then answer alike for every image. Mean-pooling (BEiT) and
    patch-mean (Dinov2) heads read the patches and may go all-convolution."""
    config = conv_config(min_attention_layers=0)
    if collapses:
        with pytest.raises(ValueError, match="min_attention_layers=0 lets the search turn every attention layer"):
            searching(make_model(name), config)
        searching(make_model(name), conv_config(min_attention_layers=0, layer_types={1: "attention"}))  # one stays
    else:
        searching(make_model(name), config)
