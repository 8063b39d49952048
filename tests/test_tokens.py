"""Token pruning's model path: equal logits at keep 1, batched = per image, masking = dropping, exact costs,
save/reload (with and without hf_vitprune), pipeline, torch.export, training-mode gradients, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessor, pipeline

from hf_vitprune import PruningPlan, add_token_pruning, apply_plan, model_stats
from hf_vitprune.tokens import TokenStages, default_depths, token_pruning_of
from test_save_reload import outputs_without_hf_vitprune
from test_stats import counted_flops

TOKEN_ARCHITECTURES = ["vit", "deit", "deit_teacher", "vit_msn"]


def logits_of(model, pixel_values):
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    return outputs.logits


@pytest.mark.parametrize("arch", TOKEN_ARCHITECTURES)
def test_keeping_every_token_gives_the_original_logits(make_model, pixel_values, arch):
    original = make_model(arch)
    pruned = add_token_pruning(make_model(arch), [1.0, 1.0])
    torch.testing.assert_close(logits_of(pruned.eval(), pixel_values), logits_of(original, pixel_values),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", TOKEN_ARCHITECTURES)
def test_batched_equals_one_image_at_a_time_and_masking_equals_dropping(make_model, arch):
    model = add_token_pruning(make_model(arch), [0.6, 0.3]).eval()
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    batched = logits_of(model, images)
    singles = torch.cat([logits_of(model, images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-6)
    path = token_pruning_of(model)
    path.decide = "top_k"  # the training-mode forward (fixed shapes, masked attention) with the same decisions
    masked = logits_of(model.train(), images)
    torch.testing.assert_close(masked, batched, rtol=1e-5, atol=1e-5)
    assert [fraction.tolist() for fraction in path.kept_fractions] == [[0.625] * 5, [0.3125] * 5]  # 10/16, 5/16


@pytest.mark.parametrize("arch", TOKEN_ARCHITECTURES)
@pytest.mark.parametrize("structural", [False, True], ids=["tokens", "stacked"])
def test_costs_equal_flop_counter_and_parameter_count(make_model, helpers, arch, structural):
    model = make_model(arch)
    if structural:  # heads, neurons and the embedding width first, then the token path
        plan = helpers.random_plan(model, 3)
        width = model.config.hidden_size
        apply_plan(model, PruningPlan(heads=plan.heads, neurons=plan.neurons, embedding=list(range(0, width, 2))))
    add_token_pruning(model, [0.5, 0.25])
    stats = model_stats(model.eval())
    assert stats.flops == counted_flops(model)
    assert stats.params == sum(p.numel() for p in model.parameters())
    if not structural:  # equal layers, fewer tokens in each later one
        flops = [layer.flops for layer in stats.layers]
        assert flops[0] > flops[1] > flops[2]


def test_costs_count_the_tokens_each_layer_sees(make_model):
    model = add_token_pruning(make_model("deit_teacher"), [0.5, 0.25], depths=[1, 2])
    # 16 patches + class and distillation tokens; 8 then 4 patches are kept, with a package token per stage
    assert token_pruning_of(model).tokens_per_layer(18, 3) == [18, 11, 8]


def test_save_reload_pipeline_and_export(make_model, tmp_path, pixel_values):
    model = add_token_pruning(make_model("vit"), [0.5, 0.25]).eval()
    expected = logits_of(model, pixel_values)
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "tokens.py").is_file()  # the remote code the config's auto_map points at
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "model").eval()
    torch.testing.assert_close(logits_of(reloaded, pixel_values), expected, rtol=0, atol=0)

    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "model")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(24, 20, 3), dtype=np.uint8))
    predictions = pipeline("image-classification", model=str(tmp_path / "model"))(image)
    inputs = AutoImageProcessor.from_pretrained(tmp_path / "model")(images=image, return_tensors="pt")
    top = int(logits_of(model, inputs["pixel_values"])[0].argmax())
    assert predictions[0]["label"] == model.config.id2label[top]

    exported = torch.export.export(model, (), {"pixel_values": pixel_values})
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(pixel_values=pixel_values).logits, expected, rtol=1e-5,
                                   atol=1e-6)


def test_reload_with_trust_remote_code_without_hf_vitprune(make_model, tmp_path, pixel_values, helpers):
    stacked = make_model("deit_teacher", seed=2)
    apply_plan(stacked, helpers.random_plan(stacked, 0))
    cases = {"vit": add_token_pruning(make_model("vit", seed=2), [0.5, 0.25]),
             "deit_teacher_stacked": add_token_pruning(stacked, [0.75])}
    jobs, expected = [], {}
    for case, model in cases.items():
        model.eval().save_pretrained(tmp_path / case)
        jobs.append((case, str(tmp_path / case), "AutoModelForImageClassification"))
        expected.update({f"{case}/{k}": v for k, v in helpers.outputs(model, pixel_values).items()})
    got, _ = outputs_without_hf_vitprune(tmp_path, jobs, pixel_values)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_training_mode_samples_decisions_that_train_the_selectors(make_model):
    model = add_token_pruning(make_model("vit"), [0.5]).train()
    path = token_pruning_of(model)
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    logits = model(pixel_values=images).logits
    (fraction,) = path.kept_fractions
    assert fraction.shape == (8,) and ((fraction > 0) & (fraction < 1)).all()  # sampled, not the fixed top-k
    logits.square().sum().backward()  # through the policy attention alone (the package passes none)
    selector = path.selectors[0]
    assert selector.local.weight.grad.abs().sum() > 0 and selector.score.grad.abs().sum() > 0
    assert model.config._attn_implementation == "hf_vitprune_token_policy"


def test_default_depths_spread_over_the_model():
    assert default_depths(12) == (3, 6, 9)
    assert default_depths(4) == (1, 2, 3)
    assert default_depths(4, 1) == (2,)


@pytest.mark.parametrize("keep, depths, message", [
    ([0.0], None, r"keep ratio 0.0 must be a number in \(0, 1\]"),
    ([1.5], None, r"keep ratio 1.5 must be a number in \(0, 1\]"),
    ([0.3, 0.6], None, "increase"),
    ([0.5], [3], r"depths \[3\] are outside the model"),
    ([0.9, 0.8, 0.7, 0.6], [0, 1, 2, 3], "4 stages but the model has 3 encoder layers"),
    ([0.9, 0.8, 0.7, 0.6], None, "do not fit the 3 encoder layers"),
    ([0.5, 0.4], [1], "2 keep ratios"),
])
def test_bad_stages_are_refused(make_model, keep, depths, message):
    model = make_model("vit")
    with pytest.raises(ValueError, match=message):
        add_token_pruning(model, keep, depths)
    assert token_pruning_of(model) is None and type(model).__name__ == "ViTForImageClassification"


@pytest.mark.parametrize("arch, reason", [("beit_layer_bias", "relative position bias"),
                                          ("dinov2", "averages the patch tokens")])
def test_families_without_a_token_path_are_refused(make_model, arch, reason):
    with pytest.raises(ValueError, match=f"has no token path: .*{reason}"):
        add_token_pruning(make_model(arch), [0.5])


def test_a_stage_list_is_checked_on_its_own():
    with pytest.raises(ValueError, match="must be distinct and increasing"):
        TokenStages(depths=(2, 1), keep_ratios=(0.5, 0.4), selector_width=4)


def test_narrowing_the_embedding_under_token_pruning_is_refused(make_model):
    model = add_token_pruning(make_model("vit"), [0.5])
    with pytest.raises(ValueError, match="Narrow the embedding width first"):
        apply_plan(model, PruningPlan(embedding=[0, 1, 2]))


def test_the_package_token_is_the_dropped_tokens_mean_weighted_by_their_keep_scores(make_model, helpers):
    """SPViT's package token: the dropped patches folded into one token by their keep scores (sigmoid of the
    selector's logits), the same at inference as in training; a plain mean (the public inference code) differs."""
    model = add_token_pruning(make_model("vit"), [0.5], depths=[1]).eval()
    path = token_pruning_of(model)
    layers = helpers.encoder_layers(model)
    seen = {}
    layers[0].register_forward_hook(lambda module, args, output: seen.update(
        before=output[0] if isinstance(output, tuple) else output))
    layers[1].register_forward_pre_hook(lambda module, args, kwargs: seen.update(
        after=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        for selector in path.selectors:  # scores that differ between tokens, so the weighting shows
            for parameter in selector.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)))
        model(pixel_values=images)
        patches = seen["before"][:, path.special:]
        scores = torch.sigmoid(path.selectors[0](patches))
    kept = scores.topk(8, dim=1).indices
    dropped = torch.ones_like(scores).scatter(1, kept, 0.0).bool()
    package = seen["after"][:, -1]
    for image in range(len(images)):
        weights = scores[image][dropped[image]]
        expected = (weights[:, None] * patches[image][dropped[image]]).sum(0) / weights.sum()
        torch.testing.assert_close(package[image], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(package[image], patches[image][dropped[image]].mean(0), atol=1e-4)
