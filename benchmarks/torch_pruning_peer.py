"""Torch-Pruning as a peer row of the benchmark: the same dense model, budget, epochs, learning rate and distillation.

What it does, per (sparsity, seed):

1. **Prune** the cached dense model with Torch-Pruning (``torch_pruning.pruner.MetaPruner``), using the
   importance its ViT examples and results table recommend (``GroupTaylorImportance``: first-order
   Taylor, gradients accumulated on the first ``calibration_samples`` training images, as the in-project
   methods rank on) with global isomorphic ranking (Torch-Pruning's ViT recipe: heads are ranked
   against heads, MLP neurons against MLP neurons, across layers). Only whole attention heads
   (``prune_num_heads=True, prune_head_dims=False``) and MLP neurons go: the patch embedding, every
   ``o_proj`` and ``fc2`` (whose outputs are the residual stream) and the classifier are ignored, so
   the embedding width stays as it is, as in the in-project methods.
2. **Budget.** The in-project budget is ``(1 - sparsity) x dense parameters``
   (``hf_vitprune.select_plan``). Torch-Pruning takes ratios, so the ratios are chosen to land on it:
   the same fraction of the heads' and of the neurons' parameters is removed (Torch-Pruning's
   "uniform" split between the two kinds), heads rounded to whole heads, and the neurons then fill
   the rest exactly, so the pruned model is at most the budget and within one neuron's cost of it.
   Ratios ``(n - 0.5) / total`` make Torch-Pruning remove exactly ``n`` units (it keeps
   ``int(total x (1 - ratio))``). Costs per unit come from ``hf_vitprune.budget.unit_costs``,
   counts from ``hf_vitprune.model_stats``.
3. **Fine-tune** the pruned model for the in-project runs' whole epoch budget (they spend part of
   it searching on the dense shapes; Torch-Pruning prunes in one shot, so all of it is fine-tuning),
   AdamW at the same learning rate, weight decay, warm-up fraction and cosine schedule, with the
   same distillation (:class:`DistillationTrainer`: ``hf_vitprune.distillation.distillation_loss``
   from a frozen copy of the dense model, the same weight and temperature as ``PruningConfig``).
4. **Record** the same fields as ``benchmarks.run.prune_once`` (there is no ADMM residual), and save the
   model as hf_vitprune's pruned class (``hf_vitprune.modeling.convert_to_pruned``: a config with the
   per-layer widths), so the benchmark reloads and times it like every other row.

transformers 5's ``ViTAttention`` reshapes with ``view(..., -1, head_dim)``, so it infers the head count
from the tensor shapes; ``num_attention_heads`` is updated after pruning for anyone who reads it.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings

import torch
from transformers import Trainer

from hf_vitprune import PruningConfig, model_stats
from hf_vitprune.architectures import find_encoder_layers
from hf_vitprune.budget import Budget, unit_costs
from hf_vitprune.distillation import distillation_loss
from hf_vitprune.metrics import make_compute_metrics
from hf_vitprune.modeling import convert_to_pruned

from .common import Settings, load_dense, run_figures, training_arguments

NAME = "torch_pruning"


def torch_pruning_version() -> str:
    from importlib.metadata import version

    return version("torch-pruning")


def unit_counts(model) -> tuple[int, int]:
    """(heads, MLP neurons) of the whole model."""
    stats = model_stats(model)
    return stats.heads, stats.neurons


def units_to_remove(model, sparsity: float, fewer_heads: int = 0) -> dict:
    """How many heads and MLP neurons to remove to land at or under the parameter budget (see module doc).

    ``fewer_heads``: remove that many heads fewer than the even split (and more neurons instead).
    """
    stats = model_stats(model)
    limit = (1.0 - sparsity) * stats.params
    costs = unit_costs(model, Budget("params", sparsity))
    head_cost, neuron_cost = costs["heads"][0], costs["neurons"][0]
    if len(set(costs["heads"])) > 1 or len(set(costs["neurons"])) > 1:
        raise ValueError("The Torch-Pruning peer expects a dense model whose layers all have the same widths.")
    heads, neurons = unit_counts(model)
    to_remove = stats.params - limit
    fraction = to_remove / (heads * head_cost + neurons * neuron_cost)
    n_heads = max(min(round(fraction * heads), heads - len(stats.layers)) - fewer_heads, 0)
    n_neurons = math.ceil((to_remove - n_heads * head_cost) / neuron_cost)
    if not 0 <= n_neurons < neurons:
        raise ValueError(f"Sparsity {sparsity} cannot be reached by heads and MLP neurons alone.")
    return {"heads": n_heads, "neurons": n_neurons, "total_heads": heads, "total_neurons": neurons,
            "limit": limit, "head_cost": head_cost, "neuron_cost": neuron_cost}


def prune_with_torch_pruning(model, sparsity: float, calibration: list[dict], *, importance: str = "taylor"):
    """A copy of ``model`` pruned with Torch-Pruning to the parameter budget, and what was done.

    ``calibration`` is a list of batches (``pixel_values`` and, for Taylor importance, ``labels``).
    ``importance="taylor"`` (``GroupTaylorImportance``, gradients of the label loss on the batches)
    is the recommended one; ``"magnitude"`` (``GroupMagnitudeImportance``, L2) needs no labels.
    Torch-Pruning's global head ranking may empty a layer, which the stock ViT cannot run (and the
    in-project methods never do: ``min_heads_per_layer=1``); then it is asked for one head fewer
    (one head's parameters more in neurons) until every layer keeps a head; ``heads_given_back`` says
    how many times.
    """
    for fewer in range(units_to_remove(model, sparsity)["heads"] + 1):
        candidate = copy.deepcopy(model)
        info = _prune_once_with_torch_pruning(candidate, sparsity, calibration, importance, fewer)
        if info is not None:
            return candidate, {**info, "heads_given_back": fewer}
    raise AssertionError("unreachable: removing no heads never empties a layer")


def _prune_once_with_torch_pruning(model, sparsity, calibration, importance, fewer_heads) -> dict | None:
    """Prune ``model`` in place; None when a layer lost every head (the caller retries with fewer heads)."""
    import torch_pruning as tp

    counts = units_to_remove(model, sparsity, fewer_heads)
    layers = find_encoder_layers(model)
    num_heads, ignored = {}, [module for module in model.modules() if isinstance(module, torch.nn.Conv2d)]
    classifier = getattr(model, "classifier", None)
    if classifier is not None:
        ignored.append(classifier)
    for layer in layers:
        attention = layer.attention
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
            num_heads[projection] = layer.num_heads
        ignored += [attention.o_proj, layer.mlp_out]
    example = {"pixel_values": calibration[0]["pixel_values"][:1]}
    started = time.perf_counter()
    imp = tp.importance.GroupTaylorImportance() if importance == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)
    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will prune the last non-singleton dimension" of cls/position tokens: ignored layers keep them
        pruner = tp.pruner.MetaPruner(
            model, example, importance=imp, global_pruning=True, isomorphic=True,
            pruning_ratio=(counts["neurons"] - 0.5) / counts["total_neurons"] if counts["neurons"] else 0.0,
            head_pruning_ratio=(counts["heads"] - 0.5) / counts["total_heads"] if counts["heads"] else 0.0,
            num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, ignored_layers=ignored,
            forward_fn=lambda m, inputs: m(**inputs), output_transform=lambda out: out.logits.sum(),
        )
        if importance == "taylor":
            model.zero_grad()
            for batch in calibration:
                logits = model(pixel_values=batch["pixel_values"]).logits
                torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        for group in pruner.step(interactive=True):
            group.prune()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    seconds = time.perf_counter() - started
    for layer in find_encoder_layers(model):
        attention = layer.attention
        attention.num_attention_heads = attention.q_proj.out_features // attention.head_dim
        if attention.num_attention_heads == 0:
            return None
    stats = model_stats(model)
    widths = {layer.attention.o_proj.out_features for layer in find_encoder_layers(model)}
    if widths != {model.config.hidden_size}:
        raise AssertionError(f"Torch-Pruning changed the embedding width ({widths}); it must stay untouched.")
    removed = {"heads": counts["total_heads"] - stats.heads, "neurons": counts["total_neurons"] - stats.neurons}
    if removed != {"heads": counts["heads"], "neurons": counts["neurons"]}:
        raise AssertionError(f"Torch-Pruning removed {removed}, asked for {counts}.")
    return {**counts, "params": stats.params, "params_gap_to_budget": counts["limit"] - stats.params,
            "seconds": seconds, "importance": type(imp).__name__}


class DistillationTrainer(Trainer):
    """A Trainer whose loss is ``(1 - w) x label loss + w x distillation_loss(student, frozen teacher, T)``.

    The same mix as ``PruningTrainer`` uses while fine-tuning (``hf_vitprune.distillation``).
    """

    def __init__(self, *args, teacher, distillation_weight: float, distillation_temperature: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.distillation_weight, self.distillation_temperature = distillation_weight, distillation_temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, dict(inputs), return_outputs=True)
        if model.training and self.distillation_weight > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(pixel_values=inputs["pixel_values"]).logits
            kd = distillation_loss(outputs.logits, teacher_logits, self.distillation_temperature)
            loss = (1 - self.distillation_weight) * loss + self.distillation_weight * kd
        return (loss, outputs) if return_outputs else loss


def prune_once(settings: Settings, data, sparsity: float, seed: int, save_dir) -> dict:
    """One Torch-Pruning run from the cached dense model; the record ``benchmarks.run.prune_once`` makes."""
    torch.manual_seed(seed)
    model = load_dense(settings)
    dense_stats = model_stats(model)
    teacher = copy.deepcopy(model)
    # the in-project recipe's distillation settings (PruningConfig's weight and temperature)
    recipe = PruningConfig(target_sparsity=sparsity, distillation_weight=settings.distillation_weight,
                           calibration_samples=settings.calibration_samples)
    train = data["train"]
    count = min(recipe.calibration_samples, len(train))
    calibration = [train[start:min(start + settings.eval_batch_size, count)]
                   for start in range(0, count, settings.eval_batch_size)]
    started = time.perf_counter()
    model, pruning = prune_with_torch_pruning(model, sparsity, calibration)
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(settings, tmp, epochs=settings.prune_epochs,
                                  learning_rate=settings.prune_learning_rate, seed=seed)
        trainer = DistillationTrainer(model=model, args=args, train_dataset=train,
                                      compute_metrics=make_compute_metrics(), teacher=teacher,
                                      distillation_weight=recipe.distillation_weight,
                                      distillation_temperature=recipe.distillation_temperature)
        trainer.train()
        train_seconds = time.perf_counter() - started
        test = trainer.evaluate(eval_dataset=data["test"], metric_key_prefix="test")
        validation = trainer.evaluate(eval_dataset=data["validation"], metric_key_prefix="validation")
    stats = model_stats(model)
    convert_to_pruned(model).save_pretrained(save_dir)
    return {
        # importance (calibration gradients) + pruning stand where the in-project methods' ranking stands
        **run_figures(NAME, sparsity, seed, test, validation, stats, dense_stats, train_seconds, pruning["seconds"],
                      finetune_steps=trainer.state.global_step),
        "admm_residual_last_logged": None,  # no ADMM: one-shot pruning
        "torch_pruning": {key: pruning[key] for key in ("importance", "heads", "neurons", "limit", "head_cost",
                                                         "neuron_cost", "params_gap_to_budget", "heads_given_back")}
        | {"version": torch_pruning_version(), "ranking": "global, isomorphic",
           "distillation_weight": recipe.distillation_weight,
           "distillation_temperature": recipe.distillation_temperature},
    }
