"""OFB: the width cost, the bi-mask, the exact budget, resume, two processes, the card, bad input."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from transformers import (
    AutoModelForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from conftest import ARCHITECTURES, assert_same_weights, build_model, uninterrupted_and_resumed
from hf_vitprune import PruningConfig, PruningPlan, PruningTrainer, attach_masks, model_stats
from hf_vitprune.architectures import find_encoder_layers
from hf_vitprune.methods import SearchContext
from hf_vitprune.methods.ofb import OFB, BiMask, one_hot_loss, searched_modules
from hf_vitprune.methods.width_cost import WidthCost

SCRIPTS = Path(__file__).parent / "scripts"


# --------------------------------------------------------------------------- the width cost


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_width_cost_equals_model_stats_at_integer_widths(arch):
    model = build_model(arch)
    cost = WidthCost(model)
    rng = random.Random(arch)
    layers = find_encoder_layers(model)
    for _ in range(3):
        heads = [rng.randint(1, layer.num_heads) for layer in layers]
        dims = [rng.randint(1, layer.head_dim) for layer in layers]
        neurons = [rng.randint(1, layer.num_neurons) for layer in layers]
        width = rng.randint(8, model.config.hidden_size)
        plan = PruningPlan(
            heads={i: list(range(h)) for i, h in enumerate(heads)},
            neurons={i: list(range(f)) for i, f in enumerate(neurons)},
            other_units={"head_dims": {i: list(range(d)) for i, d in enumerate(dims)}},
            embedding=list(range(width)),
        )
        stats = model_stats(model, plan)
        assert cost.params(heads, dims, neurons, width) == pytest.approx(stats.params, abs=1e-6)
        assert cost.flops(heads, dims, neurons, width) == pytest.approx(stats.flops, abs=1e-6)


# --------------------------------------------------------------------------- the bi-mask


def _ofb_on(model, **options) -> OFB:
    config = PruningConfig(method="ofb", target_flops_reduction=0.3, **options)
    method = OFB(config)
    method._build(model, search_steps=10)
    return method


@pytest.mark.parametrize("arch", ["vit", "beit_layer_bias", "dinov2_swiglu"])
def test_mix_one_is_the_importance_masked_model(arch, pixel_values):
    """With the mixing weight at 1 every unit is multiplied by sigmoid(s): UnitMasks with those gates agrees."""
    model = build_model(arch)
    reference = copy.deepcopy(model)
    method = _ofb_on(model, search_embedding=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for scores in method.mask.scores:
            scores.copy_(torch.randn(scores.shape, generator=generator))
    method.step, method.options.mix_start = 0, 1.0
    with torch.no_grad():
        got = model(pixel_values=pixel_values).logits
        with attach_masks(reference) as masks:
            for module, scores in zip(method.mask.searched, method.mask.scores):
                masks.gates[module.kind][module.layer] = torch.sigmoid(scores)
            want = reference(pixel_values=pixel_values).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["vit", "deit_teacher", "beit_shared_bias", "dinov2"])
def test_one_hot_distributions_give_the_prefix_masked_model(arch, pixel_values):
    """mix 0 and one active candidate per module: the forward is the hard plan's, embedding included."""
    model = build_model(arch)
    reference = copy.deepcopy(model)
    method = _ofb_on(model)
    mask = method.mask
    generator = torch.Generator().manual_seed(1)
    kept = {"heads": {}, "head_dims": {}, "neurons": {}, "embedding": None}
    with torch.no_grad():
        for i, module in enumerate(mask.searched):
            mask.scores[i].copy_(torch.randn(module.size, generator=generator))
            choice = int(torch.randint(len(module.candidates), (1,), generator=generator))
            mask.active(i).zero_()
            mask.active(i)[choice] = True
            width = module.candidates[choice]
            units = sorted(torch.argsort(-mask.scores[i], stable=True)[:width].tolist())
            if module.kind == "embedding":
                kept["embedding"] = units
            else:
                kept[module.kind][module.layer] = units
    method.options.mix_start = method.options.mix_end = 0.0
    plan = PruningPlan(heads=kept["heads"], neurons=kept["neurons"], other_units={"head_dims": kept["head_dims"]},
                       embedding=kept["embedding"])
    with torch.no_grad():
        got = model(pixel_values=pixel_values).logits
        with attach_masks(reference, plan):
            want = reference(pixel_values=pixel_values).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_prefix_mask_is_the_probability_of_being_inside_the_width():
    from hf_vitprune.methods.ofb import SearchedModule

    mask = BiMask([SearchedModule("neurons", 0, 4, [1, 2, 4])], initial_score=0.0)
    with torch.no_grad():
        mask.scores[0].copy_(torch.tensor([0.1, 0.9, 0.5, 0.3]))  # ranks 3, 0, 1, 2
        mask.logits[0].copy_(torch.log(torch.tensor([0.2, 0.3, 0.5])))
    prefix = mask.prefix_mask(0)
    # rank 0 is inside every width, rank 1 inside widths 2 and 4, ranks 2 and 3 only inside 4
    torch.testing.assert_close(prefix, torch.tensor([0.5, 1.0, 0.8, 0.5]))
    assert float(mask.expected_width(0).detach()) == pytest.approx(0.2 * 1 + 0.3 * 2 + 0.5 * 4)


def test_a_head_scored_by_its_channels_ranks_by_their_mean_importance():
    """head_score='channels' (the paper's): one score per channel of each head; a head ranks by the mean of their
    sigmoids, so one very sure channel does not outrank a head whose channels all matter, and the head's mask
    multiplies each channel by its own score."""
    method = _ofb_on(digits_vit(), head_score="channels")
    mask = method.mask
    i = next(i for i, m in enumerate(mask.searched) if m.kind == "heads")
    assert mask.searched[i].channels == 16 and mask.scores[i].shape == (4 * 16,)
    scores = torch.full((4, 16), -2.0)
    scores[0, 0] = 8.0  # head 0: one sure channel
    scores[1] = 1.0  # head 1: every channel fairly sure
    scores[3, :8] = 0.5
    with torch.no_grad():
        mask.scores[i].copy_(scores.flatten())
    assert mask.ranks(i).tolist() == [2, 0, 3, 1]
    torch.testing.assert_close(mask.importance(i), torch.sigmoid(scores).mean(dim=1))
    multiplier, prefix = mask.multipliers(mix=0.5)[i]
    torch.testing.assert_close(multiplier, 0.5 * torch.sigmoid(scores.flatten()) + 0.5 * prefix.repeat_interleave(16))


def test_one_hot_loss_falls_toward_one_hot():
    active = torch.ones(4, dtype=torch.bool)
    uniform = one_hot_loss(torch.full((4,), 0.25), active)
    peaked = one_hot_loss(torch.tensor([0.7, 0.1, 0.1, 0.1]), active)
    sharper = one_hot_loss(torch.tensor([0.97, 0.01, 0.01, 0.01]), active)
    assert uniform > peaked > sharper
    assert float(one_hot_loss(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([False, True, False]))) == 0.0


@pytest.mark.parametrize("lead, ratio", [(1.0, 10.0), (2.0, 1.3)])
def test_one_hot_loss_pushes_harder_than_the_entropy_once_a_candidate_leads(lead, ratio):
    """The tangent term is what makes the loss adaptive: once one candidate leads (sigma_hat above the 0.02 clamp),
    it pulls the leader up harder than the entropy alone, most where the distribution is still nearly flat."""
    logits = torch.zeros(7)
    logits[0] = lead
    active = torch.ones(7, dtype=torch.bool)

    def pull(loss_of) -> float:
        leaf = logits.clone().requires_grad_()
        loss_of(torch.softmax(leaf, dim=0)).backward()
        return -float(leaf.grad[0])  # descent raises the leading logit by this much per unit step

    entropy = pull(lambda p: -(p * p.log()).sum())
    assert entropy > 0
    assert pull(lambda p: one_hot_loss(p, active)) > ratio * entropy


def test_shrinking_drops_unlikely_candidates_and_keeps_the_likeliest(pixel_values):
    model = build_model("vit")
    method = _ofb_on(model)
    mask = method.mask
    i = next(i for i, m in enumerate(mask.searched) if m.kind == "neurons")
    k = len(mask.searched[i].candidates)
    with torch.no_grad():
        mask.logits[i].copy_(torch.linspace(-6, 2, k))
    method.shrink()
    probabilities = torch.softmax(torch.linspace(-6, 2, k), 0)
    assert mask.active(i).tolist() == (probabilities >= 0.2 / k).tolist()
    assert bool(mask.active(i)[-1])


# --------------------------------------------------------------------------- end to end on digits


def digits() -> Dataset:
    """The first 256 of scikit-learn's digits in [0, 1], in their file order: enough for a few search steps."""
    images, labels = load_digits(return_X_y=True)
    images = torch.tensor(images[:256], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return Dataset.from_dict({"pixel_values": images.numpy(), "labels": labels[:256]}).with_format("torch")


def digits_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                               intermediate_size=128, image_size=8, patch_size=2, num_channels=1,
                                               num_labels=10))


def ofb_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(max_steps=12, per_device_train_batch_size=32, learning_rate=1e-3, report_to=[], save_strategy="no",
                  disable_tqdm=True, seed=0, use_cpu=True, logging_steps=2)
    values.update(overrides)
    return TrainingArguments(str(output_dir), **values)


def ofb_config(**overrides) -> PruningConfig:
    values = dict(method="ofb", target_flops_reduction=0.3, calibration_samples=32, shrink_interval=2,
                  warmup_fraction=0.3, distillation_weight=0.0)
    values.update(overrides)
    return PruningConfig(**values)


@pytest.mark.parametrize("target", [{"target_flops_reduction": 0.3}, {"target_flops_reduction": 0.5},
                                    {"target_sparsity": 0.3}, {"target_sparsity": 0.5}], ids=str)
def test_budget_lands_within_one_percent_on_digits(tmp_path, target):
    config = ofb_config(**{"target_flops_reduction": None, **target})
    trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path), train_dataset=digits(),
                             pruning_config=config)
    dense = model_stats(trainer.model)
    trainer.train()
    stats = model_stats(trainer.model)
    metric, fraction = ("flops", target["target_flops_reduction"]) if "target_flops_reduction" in target else (
        "params", target["target_sparsity"])
    kept = getattr(stats, metric) / getattr(dense, metric)
    assert abs(kept - (1 - fraction)) <= 0.01
    assert kept <= 1 - fraction + 1e-9  # never over the budget
    assert stats.params == sum(p.numel() for p in trainer.model.parameters())
    searched = trainer.method.searched_widths
    assert set(searched) >= {"embedding", "head_dims.0", "neurons.3", "heads.2"}
    assert trainer.model.config.hidden_size == len(trainer.plan.embedding)


def test_the_budget_loss_moves_the_expected_cost_toward_the_target(tmp_path):
    """The search, not only the final exact selection, answers the budget: from the same start (the bi-mask's
    uniform distributions), the expected cost climbs toward a loose target and falls toward a tight one."""
    def expected_cost_ratios(reduction: float) -> list[float]:
        trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path / str(reduction), max_steps=24,
                                                                   logging_steps=1),
                                 train_dataset=digits(), pruning_config=ofb_config(target_flops_reduction=reduction))
        trainer.train()
        return [entry["ofb_expected_cost_ratio"] for entry in trainer.state.log_history
                if "ofb_expected_cost_ratio" in entry and entry.get("phase_search") == 1.0]

    loose, tight = expected_cost_ratios(0.2), expected_cost_ratios(0.6)
    assert loose[0] == pytest.approx(tight[0])  # the same start
    assert loose[-1] > loose[0] + 0.05 and tight[-1] < tight[0] - 0.03
    assert loose[-1] - tight[-1] > 0.1


@pytest.mark.parametrize("schedule", ["weights", "constant"])
def test_the_architecture_logits_follow_the_chosen_schedule(tmp_path, schedule):
    """arch_schedule='constant' keeps the logits at arch_learning_rate through the search while the weights follow
    the Trainer's cosine schedule; 'weights' decays them alike."""
    trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path, lr_scheduler_type="cosine", warmup_steps=2),
                             train_dataset=digits(), pruning_config=ofb_config(arch_schedule=schedule))
    method = trainer.method
    trainer.phase = method.phase_name
    method.setup(SearchContext(model=trainer.model, budget=trainer.pruning_config.budget, search_steps=10,
                               calibration_batches=trainer._calibration_batches))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    logits = next(g for g in trainer.optimizer.param_groups if g["params"][0] is method.mask.logits[0])
    weights = trainer.optimizer.param_groups[0]
    rates = []
    for _ in range(10):
        rates.append((logits["lr"], weights["lr"]))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates[-1][1] < 0.1 * max(w for _, w in rates)  # the weights' cosine, after its warm-up
    arch = [a for a, _ in rates]
    if schedule == "constant":
        assert arch == [pytest.approx(0.05)] * len(arch)
    else:
        assert arch[0] == 0.0 and max(arch) == pytest.approx(0.05) and arch[-1] < 0.1 * 0.05


# fast-moving logits under a budget the uniform start exceeds: units are sliced out within a few steps
SHRINKING = dict(arch_learning_rate=0.5, shrink_threshold=0.9, target_flops_reduction=0.5, shrink_interval=1)


@pytest.mark.parametrize("fraction, narrows", [(0.25, False), (0.5, True)])
def test_the_final_selection_keeps_the_grids_narrowest_heads_and_mlp(fraction, narrows):
    """The exact budget selection honours the search grid (head_step heads, min_mlp_fraction of the MLP): when the
    search leaves the head dims and the embedding at full width, they narrow (most likely candidate first) only when
    those minimums cannot meet the budget otherwise."""
    model = digits_vit()
    config = ofb_config(target_flops_reduction=0.6, min_mlp_fraction=fraction)
    method = OFB(config)
    method.setup(SearchContext(model=model, budget=config.budget, search_steps=10, calibration_batches=[]))
    mask = method.mask
    with torch.no_grad():
        for i, module in enumerate(mask.searched):  # every module most sure of its widest candidate
            mask.logits[i].copy_(torch.linspace(0, 5, len(module.candidates)))
    plan = method.finalize(model)
    assert min(len(kept) for kept in plan.neurons.values()) >= math.ceil(fraction * 128)
    assert min(len(kept) for kept in plan.heads.values()) >= config.method_options.head_step
    kept = config.budget.measure(model_stats(model, plan)) / method.dense_measure
    assert 0.39 <= kept <= 0.4  # the budget, exactly
    widths = [len(plan.embedding or range(64))] + [len(d) for d in plan.other_units.get("head_dims", {}).values()]
    assert (min(widths) < 16) == narrows


@pytest.mark.parametrize("reduction", [0.2, 0.6])
def test_head_dims_and_embedding_widen_when_they_leave_the_model_under_budget(reduction):
    """A search sure of its narrowest head dims and embedding (which alone leave 31% of the dense FLOPs) still
    lands on the budget: they widen, the likeliest candidate first, until the heads and neurons can spend it."""
    model = digits_vit()
    config = ofb_config(target_flops_reduction=reduction)
    method = OFB(config)
    method.setup(SearchContext(model=model, budget=config.budget, search_steps=10, calibration_batches=[]))
    mask = method.mask
    with torch.no_grad():
        for i, module in enumerate(mask.searched):  # narrowest head dims and embedding, widest heads and MLPs
            sure = torch.linspace(0, 5, len(module.candidates))
            mask.logits[i].copy_(-sure if module.kind in ("head_dims", "embedding") else sure)
    plan = method.finalize(model)
    kept = config.budget.measure(model_stats(model, plan)) / method.dense_measure
    assert 1 - reduction - 0.01 <= kept <= 1 - reduction
    assert len(plan.embedding) > 16 and plan.heads and plan.neurons  # widened, then heads and neurons selected


@pytest.mark.parametrize("head_score", ["own", "channels"])
def test_a_shrink_step_keeps_the_loss_and_slices_the_optimizer_state(tmp_path, head_score):
    trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path), train_dataset=digits(),
                             pruning_config=ofb_config(head_score=head_score))
    model, method = trainer.model, trainer.method
    trainer.phase = method.phase_name
    method.setup(SearchContext(model=model, budget=trainer.pruning_config.budget, search_steps=10,
                               calibration_batches=trainer._calibration_batches))
    optimizer = trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    for step in range(1, 4):  # Adam moments to slice
        trainer.compute_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        method.on_step_end(model, step)
    mask = method.mask
    for i in range(len(mask.searched)):  # every module's widest candidates become unlikely: all kinds shrink
        with torch.no_grad():
            mask.logits[i].copy_(torch.linspace(2, -6, len(mask.searched[i].candidates)))
    method.shrink()
    with torch.no_grad():
        before = trainer.compute_loss(model, batch)
    layer = find_encoder_layers(model)[1]
    tensors = {"q": layer.attention.q_proj.weight, "fc2": layer.mlp_out.weight,
               "cls": model.vit.embeddings.cls_token, "scores": mask.scores[0]}
    moments = {name: optimizer.state[t]["exp_avg"].clone() for name, t in tensors.items()}
    steps = {name: optimizer.state[t]["step"].clone() for name, t in tensors.items()}
    plan = method.pending_compaction()
    trainer._compact_during_search(plan)

    with torch.no_grad():
        after = trainer.compute_loss(model, batch)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert method.pending_compaction() is None
    heads, dims = plan.heads[1], plan.units_of("head_dims")[1]
    channels, neurons = plan.embedding, plan.neurons[1]
    assert len(heads) < 4 and len(dims) < 16 and len(channels) < 64 and len(neurons) < 128  # every kind sliced
    rows = [h * 16 + d for h in heads for d in dims]
    layer = find_encoder_layers(model)[1]
    new = {"q": layer.attention.q_proj.weight, "fc2": layer.mlp_out.weight,
           "cls": model.vit.embeddings.cls_token, "scores": mask.scores[0]}
    scores = plan.heads[0] if head_score == "own" else [h * 16 + d for h in plan.heads[0]
                                                         for d in plan.units_of("head_dims")[0]]
    expected = {"q": moments["q"][rows][:, channels], "fc2": moments["fc2"][channels][:, neurons],
                "cls": moments["cls"][..., channels], "scores": moments["scores"][scores]}
    for name, tensor in new.items():
        assert tensor is not tensors[name] and tensor in optimizer.state
        torch.testing.assert_close(optimizer.state[tensor]["exp_avg"], expected[name], rtol=0, atol=0)
        assert optimizer.state[tensor]["step"] == steps[name]
    assert not any(t in optimizer.state for t in tensors.values())
    trainer.compute_loss(model, batch).backward()  # the search trains on: the smaller tensors step
    optimizer.step()


@pytest.mark.parametrize("head_score", ["own", "channels"])
def test_slicing_mid_search_gives_the_search_that_keeps_the_dense_shapes(tmp_path, head_score):
    def run(physical):
        config = ofb_config(**SHRINKING, physical_shrinking=physical, head_score=head_score)
        trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path / str(physical)), train_dataset=digits(),
                                 pruning_config=config)
        trainer.train()
        return trainer

    sliced, dense = run(True), run(False)
    assert max(e.get("ofb_sliced_units", 0) for e in sliced.state.log_history) > 0
    assert not any("ofb_sliced_units" in e for e in dense.state.log_history)
    assert sliced.plan == dense.plan  # the composed mid-search plans name the units of the dense model
    assert sliced.method.searched_widths == dense.method.searched_widths
    pixels = digits()[:16]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(sliced.model.eval()(pixels).logits, dense.model.eval()(pixels).logits,
                                   rtol=1e-4, atol=1e-4)


def test_resume_mid_search_after_shrinking_equals_the_uninterrupted_run(tmp_path):
    config = ofb_config(**SHRINKING)  # units are sliced out by step 4

    def make_trainer(directory):
        args = ofb_args(directory, save_strategy="steps", save_steps=4)
        return PruningTrainer(model=digits_vit(), args=args, train_dataset=digits(), pruning_config=config)

    # killed after the step-4 checkpoint, which follows a shrink
    reference, resumed = uninterrupted_and_resumed(make_trainer, tmp_path, "search", crash=4)
    assert resumed.method.searched_widths == reference.method.searched_widths
    # the checkpoint resumed from holds shrunk candidate sets
    state = load_file(tmp_path / "resumed" / "search" / "checkpoint-4" / "pruning_state.safetensors")
    actives = [v for k, v in state.items() if k.startswith("ofb.active_")]
    assert actives and any(not bool(v.all()) for v in actives)
    # ... and a model compacted mid-search, which the resumed run rebuilt before loading its weights
    sliced = json.loads((tmp_path / "resumed" / "search" / "checkpoint-4" / "pruning_state.json").read_text())["plan"]
    assert sliced is not None and PruningPlan.from_dict(sliced) != PruningPlan()
    assert resumed.plan == reference.plan
    assert_same_weights(resumed.model, reference.model)


def test_two_processes_derive_the_same_architecture(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPTS / "distributed_prune.py"), str(tmp_path), "ofb"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert runs[0] == runs[1]  # the same architecture, and the same weights after every search step
    assert runs[0]["world_size"] == 2 and runs[0]["plan"]["embedding"]
    assert runs[0]["sliced_units"] > 0 and len(runs[0]["search_weights"]) == 5  # DDP re-wrapped mid-search
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "model")
    assert reloaded.config.hidden_size == len(runs[0]["plan"]["embedding"])


def test_card_names_the_method_its_widths_and_citation(tmp_path):
    # a budget the grid's narrowest heads and MLPs meet only with narrower head dims and embedding
    config = ofb_config(target_flops_reduction=0.6, min_mlp_fraction=0.5)
    trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path, max_steps=6), train_dataset=digits(),
                             pruning_config=config)
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    assert "Once for Both" in card and "ye2024once" in card
    assert "Searched widths: heads.0" in card and "embedding" in card and "PMIM" in card
    width = trainer.model.config.hidden_size
    assert f"| Embedding width | 64 | {width} |" in card and "| Head dims |" in card
    head_dims = [layer.attention.head_dim for layer in find_encoder_layers(trainer.model)]
    for index, d in enumerate(head_dims):
        assert re.search(rf"^\| {index} \| [^|]+ \| [^|]+ \| {d} \|", card, re.MULTILINE)
    assert any("ofb_pmim" in entry for entry in trainer.state.log_history)


# --------------------------------------------------------------------------- bad input


def test_a_target_below_the_candidate_grid_is_refused(tmp_path):
    config = ofb_config(target_flops_reduction=0.97)
    trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path), train_dataset=digits(),
                             pruning_config=config)
    with pytest.raises(ValueError, match="narrowest model OFB's candidate grid allows"):
        trainer.train()
    model = trainer.model  # left without the search's hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("option, value, message", [
    ("min_embedding_fraction", 0.0, "min_embedding_fraction=0.0 must be a finite number > 0"),
    ("min_embedding_fraction", 1.5, "min_embedding_fraction=1.5 must be a finite number > 0 and <= 1"),
    ("grid_steps", 0, "grid_steps=0 must be an integer >= 1"),
    ("search_embedding", "yes", "search_embedding='yes' must be True or False"),
])
def test_bad_options_name_the_field(option, value, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(method="ofb", target_sparsity=0.3, **{option: value})


def test_searched_modules_follow_the_config():
    model = build_model("vit")
    config = PruningConfig(method="ofb", target_sparsity=0.3, prune_heads=False, search_embedding=False)
    kinds = {m.kind for m in searched_modules(model, config, config.method_options)}
    assert kinds == {"head_dims", "neurons"}


# --------------------------------------------------------------------------- PMIM


def test_pmim_masks_the_planned_share_and_reconstructs_the_normalised_patches(pixel_values):
    from hf_vitprune.methods.pmim import PatchMaskReconstruction

    model = build_model("vit").train()
    for module in model.modules():  # no dropout: the eval check below compares logits exactly
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    pmim = PatchMaskReconstruction(model, seed=3)
    torch.nn.init.normal_(pmim.mask_token)
    seen = {}
    patches = model.vit.embeddings.patch_embeddings
    patches.register_forward_hook(lambda m, a, out: seen.__setitem__("patches", out))
    model.vit.layers[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("hidden", out))
    pmim.ratio, pmim.step = 0.25, 7
    model(pixel_values=pixel_values)
    masked = (seen["patches"] == pmim.mask_token).all(-1)
    assert masked.sum(1).tolist() == [4, 4]  # 16 patches per image, a quarter masked
    # the reference loss, computed here from the captured hidden states
    tokens = seen["hidden"][:, -16:, :].transpose(1, 2).reshape(2, 32, 4, 4)
    recon = torch.nn.functional.pixel_shuffle(pmim.decoder(tokens), 4)  # (2, 3, 16, 16)
    def patchify(x):
        return x.reshape(2, 3, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 48)
    target = patchify(pixel_values)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    error = (patchify(recon) - target).abs().mean(-1)
    torch.testing.assert_close(pmim.loss(), error[masked].mean())
    model.eval()
    with torch.no_grad():
        with_hooks = model(pixel_values=pixel_values).logits
        pmim.remove()
        without = model(pixel_values=pixel_values).logits
    torch.testing.assert_close(with_hooks, without, rtol=0, atol=0)


def test_pmim_can_be_switched_off(tmp_path):
    trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path, max_steps=4), train_dataset=digits(),
                             pruning_config=ofb_config(pmim=False))
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert "ofb_budget" in logged and "ofb_pmim" not in logged


def test_mixing_weight_and_pmim_mask_ratio_ramp_over_the_warm_up_then_hold(tmp_path):
    """The bi-mask moves from the importance mask (mix 0.99) to the sparsity mask (0.1), and PMIM from masking
    5% of the patches to 25%, linearly over the first warmup_fraction of the search, then both hold: what each
    training forward of a 10-step search saw (warm-up 0.2 x 10 = 2 steps)."""
    trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path, max_steps=20), train_dataset=digits(),
                             pruning_config=ofb_config(warmup_fraction=0.2, search_fraction=0.5))
    method, seen = trainer.method, []
    refresh = method._refresh

    def recording(module, args):
        refresh(module, args)
        if module.training:
            seen.append((round(method.mix, 6), round(method.pmim.ratio, 6)))

    method._refresh = recording
    trainer.train()
    assert seen == [(0.99, 0.05), (0.545, 0.15)] + [(0.1, 0.25)] * 8


def test_a_model_without_searchable_widths_is_refused():
    """Heads of one per layer (nothing between 1 and 1) and the other widths switched off: a clear error."""
    model = ViTForImageClassification(ViTConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=1,
                                                intermediate_size=16, image_size=8, patch_size=4, num_labels=3))
    config = PruningConfig(method="ofb", target_sparsity=0.3, prune_neurons=False, search_head_dims=False,
                           search_embedding=False)
    with pytest.raises(ValueError, match="OFB has nothing to search on this ViTForImageClassification"):
        searched_modules(model, config, config.method_options)


def test_a_fine_tuning_checkpoint_keeps_the_searched_widths_for_the_card(tmp_path):
    args = ofb_args(tmp_path, save_strategy="steps", save_steps=8)
    first = PruningTrainer(model=digits_vit(), args=args, train_dataset=digits(), pruning_config=ofb_config())
    first.train()
    resumed = PruningTrainer(model=digits_vit(), args=args, train_dataset=digits(), pruning_config=ofb_config())
    resumed.train(resume_from_checkpoint=str(tmp_path / "finetune" / "checkpoint-8"))
    assert resumed.method.searched_widths == first.method.searched_widths
    assert any("Searched widths" in line for line in resumed.method.card_recipe())


@pytest.mark.parametrize("arch", ["deit_teacher", "beit_shared_bias", "dinov2_swiglu"])
def test_ofb_runs_on_other_families_and_its_result_reloads(arch, tmp_path, pixel_values):
    """A short OFB run on each family with its own quirks (distillation head, shared bias table, SwiGLU with
    layer scale): the saved model reloads with identical logits and the budget holds."""
    model = build_model(arch)
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"pixel_values": torch.randn(32, 3, 16, 16, generator=generator).numpy(),
                              "labels": torch.randint(0, 5, (32,), generator=generator).numpy()}).with_format("torch")
    dense = model_stats(model)
    trainer = PruningTrainer(model=model, args=ofb_args(tmp_path, max_steps=6, per_device_train_batch_size=8),
                             train_dataset=data, pruning_config=ofb_config(target_flops_reduction=0.3))
    trainer.train()
    trainer.save_model()
    pruned = trainer.model.eval()
    assert model_stats(pruned).flops <= 0.7 * dense.flops
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixel_values).logits, pruned(pixel_values=pixel_values).logits,
                                   rtol=0, atol=0)
