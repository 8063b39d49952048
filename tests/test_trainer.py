"""PruningTrainer end to end: budgets, real data, exact resume, distributed agreement, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

import hf_vitprune
from conftest import SimulatedCrash
from hf_vitprune import PruningConfig, PruningPlan, PruningTrainer, model_stats
from hf_vitprune.data import load_digits_dataset

SCRIPTS = Path(__file__).parent / "scripts"


def tiny_vit(seed: int = 0, **overrides) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                  image_size=16, patch_size=4, num_labels=5)
    config.update(overrides)
    return ViTForImageClassification(ViTConfig(**config))


def random_images(count: int = 64, seed: int = 0, channels: int = 3, size: int = 16) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({
        "pixel_values": torch.randn(count, channels, size, size, generator=generator).numpy(),
        "labels": torch.randint(0, 5, (count,), generator=generator).numpy(),
    }).with_format("torch")


def arguments(output_dir, **overrides) -> TrainingArguments:
    values = dict(max_steps=6, per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=1e-3,
                  report_to=[], save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True, logging_steps=2)
    values.update(overrides)
    return TrainingArguments(str(output_dir), **values)


def pruning(**overrides) -> PruningConfig:
    values = dict(target_sparsity=0.4, calibration_samples=16, admm_update_steps=2, admm_fraction=0.5)  # ADMM, not one shot
    values.update(overrides)
    return PruningConfig(**values)


def accuracy(prediction) -> dict:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((logits.argmax(-1) == prediction.label_ids).mean())}


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("method", ["gohsp", "magnitude", "taylor", "random"])
@pytest.mark.parametrize("target", [0.3, 0.4, 0.6])
def test_parameter_budget_is_hit_after_train(tmp_path, method, target):
    model = tiny_vit()
    dense = model_stats(model).params
    trainer = PruningTrainer(model=model, args=arguments(tmp_path), train_dataset=random_images(),
                             pruning_config=pruning(method=method, target_sparsity=target))
    trainer.train()
    pruned = sum(p.numel() for p in trainer.model.parameters())
    assert abs((1 - pruned / dense) - target) <= 0.005
    assert type(trainer.model).__name__ == "PrunedViTForImageClassification"
    # the plan the trainer reports is what the model physically holds
    assert model_stats(trainer.model).params == model_stats(tiny_vit(), trainer.plan).params


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_flops_budget_is_hit_after_train(tmp_path, target):
    model = tiny_vit()
    dense = model_stats(model).flops
    trainer = PruningTrainer(model=model, args=arguments(tmp_path), train_dataset=random_images(),
                             pruning_config=pruning(target_sparsity=None, target_flops_reduction=target))
    trainer.train()
    assert abs((1 - model_stats(trainer.model).flops / dense) - target) <= 0.005


def test_save_model_writes_a_reloadable_pruned_model(tmp_path):
    trainer = PruningTrainer(model=tiny_vit(), args=arguments(tmp_path), train_dataset=random_images(),
                             pruning_config=pruning())
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert PruningConfig.from_pretrained(out) == trainer.pruning_config
    assert PruningPlan.from_pretrained(out) == trainer.plan
    assert not list(out.glob("*.bin")), "no pickles in the model directory"
    reloaded = AutoModelForImageClassification.from_pretrained(out).eval()
    x = torch.randn(2, 3, 16, 16)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=x).logits, trainer.model(pixel_values=x).logits)
    widths = [(layer.heads, layer.neurons) for layer in model_stats(reloaded).layers]
    planned = [(len(trainer.plan.kept_heads(i, 4)), len(trainer.plan.kept_neurons(i, 37))) for i in range(3)]
    assert widths == planned


# --------------------------------------------------------------------------- real data


def test_gohsp_on_digits_stays_within_three_points_of_dense(tmp_path):
    digits = load_digits_dataset(seed=0)
    model = tiny_vit(hidden_size=64, num_hidden_layers=4, intermediate_size=128, image_size=8, patch_size=2,
                     num_channels=1, num_labels=10)
    common = dict(per_device_train_batch_size=64, learning_rate=2e-3, weight_decay=0.05, warmup_steps=10,
                  logging_steps=50, max_steps=-1)
    dense_trainer = Trainer(model=model, args=arguments(tmp_path / "dense", num_train_epochs=25, **common),
                            train_dataset=digits["train"], eval_dataset=digits["test"], compute_metrics=accuracy)
    dense_trainer.train()
    dense_accuracy = dense_trainer.evaluate()["eval_accuracy"]
    assert dense_accuracy > 0.85, "the dense reference must have learnt the task for the comparison to mean anything"
    dense_params = model_stats(model).params  # the pruner compacts this very model in place

    trainer = PruningTrainer(model=model, args=arguments(tmp_path / "pruned", num_train_epochs=20, **common),
                             train_dataset=digits["train"], eval_dataset=digits["test"], compute_metrics=accuracy,
                             pruning_config=PruningConfig(target_sparsity=0.4, calibration_samples=256))
    metrics = trainer.train().metrics
    assert abs(1 - model_stats(trainer.model).params / dense_params - 0.4) <= 0.005
    assert metrics["eval_accuracy"] >= dense_accuracy - 0.03, (metrics["eval_accuracy"], dense_accuracy)


# --------------------------------------------------------------------------- resume


def _resume_run(output_dir, crash=None):
    args = arguments(output_dir, max_steps=8, save_strategy="steps", save_steps=2)
    trainer = PruningTrainer(model=tiny_vit(), args=args, train_dataset=random_images(),
                             pruning_config=pruning(admm_update_steps=1))
    if crash is None:
        trainer.train()
        return trainer
    trainer.add_callback(SimulatedCrash(trainer, *crash))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    resumed = PruningTrainer(model=tiny_vit(), args=args, train_dataset=random_images(),
                             pruning_config=pruning(admm_update_steps=1))
    resumed.train(resume_from_checkpoint=True)
    return resumed


@pytest.mark.parametrize("crash", [("admm", 2), ("finetune", 2)], ids=["mid-admm", "mid-finetune"])
def test_resume_gives_the_same_final_weights(tmp_path, crash):
    reference = _resume_run(tmp_path / "reference")
    resumed = _resume_run(tmp_path / "resumed", crash)
    assert resumed.plan == reference.plan
    expected, got = reference.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_checkpoints_carry_the_pruning_state(tmp_path):
    args = arguments(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    trainer = PruningTrainer(model=tiny_vit(), args=args, train_dataset=random_images(), pruning_config=pruning())
    trainer.train()
    admm_state = json.loads((tmp_path / "admm" / "checkpoint-2" / "pruning_state.json").read_text())
    tensors = load_file(tmp_path / "admm" / "checkpoint-2" / "pruning_state.safetensors")
    assert admm_state["phase"] == "admm"
    assert any(k.startswith("admm.Z.") for k in tensors) and any(k.startswith("admm.U.") for k in tensors)
    assert any(k.startswith("importance.heads.") for k in tensors)
    finetune_state = json.loads((tmp_path / "finetune" / "checkpoint-4" / "pruning_state.json").read_text())
    assert finetune_state["phase"] == "finetune"
    assert PruningPlan.from_dict(finetune_state["plan"]) == trainer.plan


# --------------------------------------------------------------------------- distributed


def test_two_processes_derive_identical_plans(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPTS / "distributed_prune.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    plans = [PruningPlan.from_json_string((tmp_path / f"rank{r}_plan.json").read_text()) for r in (0, 1)]
    assert plans[0] == plans[1]
    importances = [json.loads((tmp_path / f"rank{r}_importance.json").read_text()) for r in (0, 1)]
    assert importances[0] == importances[1] and importances[0]["world_size"] == 2
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "model")
    widths = [(layer.heads, layer.neurons) for layer in model_stats(reloaded).layers]
    assert widths == [(len(plans[0].kept_heads(i, 4)), len(plans[0].kept_neurons(i, 37))) for i in range(3)]


# --------------------------------------------------------------------------- bad input


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method='obs' is unknown; choose one of gohsp"):
        PruningConfig(method="obs", target_sparsity=0.4)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_sparsity_outside_the_open_interval_is_rejected(value):
    with pytest.raises(ValueError, match="target_sparsity=.* must lie strictly between 0 and 1"):
        PruningConfig(target_sparsity=value)


def test_unreachable_budget_under_minimum_heads(tmp_path):
    trainer = PruningTrainer(model=tiny_vit(), args=arguments(tmp_path), train_dataset=random_images(),
                             pruning_config=pruning(target_sparsity=0.95, min_heads_per_layer=4))
    with pytest.raises(ValueError, match="unreachable|cannot"):
        trainer.train()


def test_empty_calibration_set(tmp_path):
    empty = random_images().select([])
    trainer = PruningTrainer(model=tiny_vit(), args=arguments(tmp_path), train_dataset=empty,
                             pruning_config=pruning())
    with pytest.raises(ValueError, match="calibration set is empty"):
        trainer.train()


def test_unsupported_model_is_rejected(tmp_path):
    swin = SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                 num_heads=[1, 2], window_size=4, num_labels=5))
    with pytest.raises(ValueError, match="cannot prune SwinForImageClassification.*Supported models are"):
        PruningTrainer(model=swin, args=arguments(tmp_path), train_dataset=random_images(size=32),
                       pruning_config=pruning())


def test_resume_from_a_folder_that_is_not_a_pruning_checkpoint(tmp_path):
    trainer = PruningTrainer(model=tiny_vit(), args=arguments(tmp_path), train_dataset=random_images(),
                             pruning_config=pruning())
    with pytest.raises(FileNotFoundError, match="not a PruningTrainer checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path))


def test_nan_loss_during_admm_stops_and_keeps_the_last_checkpoint(tmp_path):
    data = random_images(count=64)
    pixels = data[:]["pixel_values"].clone()
    pixels[32:] = float("nan")  # batches 5.. (8 per batch, sequential sampler below) are poisoned
    poisoned = Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": data[:]["labels"].numpy()}).with_format("torch")

    class Sequential(PruningTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = arguments(tmp_path, max_steps=12, save_strategy="steps", save_steps=2)
    trainer = Sequential(model=tiny_vit(), args=args, train_dataset=poisoned,
                         pruning_config=pruning(calibration_samples=8))
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 4 of the admm phase.*checkpoint-4"):
        trainer.train()
    checkpoint = tmp_path / "admm" / "checkpoint-4"
    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert json.loads((checkpoint / "pruning_state.json").read_text())["phase"] == "admm"
    assert not (tmp_path / "admm" / "checkpoint-6").exists()


# --------------------------------------------------------------------------- TrainingArguments keep working


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps, self.begins = [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begins.append((state.global_step, state.max_steps))

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((state.global_step, state.epoch))


def test_the_trainer_state_describes_one_continuous_run(tmp_path):
    args = arguments(tmp_path, max_steps=8, save_strategy="steps", save_steps=3, logging_steps=1)
    trainer = PruningTrainer(model=tiny_vit(), args=args, train_dataset=random_images(), pruning_config=pruning())
    recorder = StepRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    assert [step for step, _ in recorder.steps] == list(range(1, 9))  # callbacks see steps 1..8 across both phases
    epochs = [epoch for _, epoch in recorder.steps]
    assert epochs == sorted(epochs) and epochs[-1] == pytest.approx(1.0)  # 64 images / 8 per batch = 8 steps
    assert recorder.begins == [(0, 4), (4, 8)]
    assert trainer.state.global_step == trainer.state.max_steps == 8
    logged = [log["step"] for log in trainer.state.log_history if "loss" in log]
    assert logged == list(range(1, 9))
    saved = json.loads((tmp_path / "finetune" / "checkpoint-6" / "trainer_state.json").read_text())
    assert saved["global_step"] == 6 and saved["max_steps"] == 8
    assert [log["step"] for log in saved["log_history"] if "loss" in log] == list(range(1, 7))
    assert (tmp_path / "admm" / "checkpoint-3").is_dir() and not (tmp_path / "finetune" / "checkpoint-3").exists()


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    """2 x 4 accumulated equals 1 x 8: label loss, ADMM penalty and distillation are all scaled per step.

    Plain SGD, so that the comparison is about the gradients: Adam turns the rounding noise of
    near-zero gradients (k_proj's bias) into full-size updates.
    """
    runs = []
    for batch, accumulation in ((8, 1), (4, 2)):
        args = arguments(tmp_path / f"b{batch}", per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accumulation, train_sampling_strategy="sequential",
                         optim="sgd", learning_rate=0.05)
        trainer = PruningTrainer(model=tiny_vit(), args=args, train_dataset=random_images(),
                                 pruning_config=pruning())
        trainer.train()
        runs.append(trainer)
    assert runs[0].plan == runs[1].plan
    for name, tensor in runs[0].model.state_dict().items():
        torch.testing.assert_close(runs[1].model.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_each_phase_logs_its_pruning_metrics(tmp_path):
    trainer = PruningTrainer(model=tiny_vit(), args=arguments(tmp_path, logging_steps=1), train_dataset=random_images(),
                             pruning_config=pruning())
    trainer.train()
    admm = [log for log in trainer.state.log_history if log.get("phase_admm") == 1.0 and "loss" in log]
    finetune = [log for log in trainer.state.log_history if log.get("phase_admm") == 0.0 and "loss" in log]
    assert admm and finetune
    for key in ("admm_penalty", "admm_residual", "kept_heads", "kept_neurons", "params", "flops", "label_loss"):
        assert key in admm[-1], key
    assert admm[-1]["admm_penalty"] > 0 and 0 < admm[-1]["admm_residual"]
    assert "distillation_loss" in finetune[-1] and finetune[-1]["params"] == model_stats(trainer.model).params


@pytest.mark.parametrize("admm_steps, update_steps", [(6, 2), (7, 3)])
def test_rho_final_is_reached_at_the_last_admm_update(tmp_path, admm_steps, update_steps):
    config = pruning(admm_rho=1e-3, admm_rho_final=0.5, admm_update_steps=update_steps, admm_fraction=0.5)
    trainer = PruningTrainer(model=tiny_vit(), args=arguments(tmp_path, max_steps=2 * admm_steps, logging_steps=1),
                             train_dataset=random_images(), pruning_config=config)
    trainer.train()
    rhos = [log["admm_rho"] for log in trainer.state.log_history if log.get("phase_admm") == 1.0 and "admm_rho" in log]
    assert trainer.method.admm.step == admm_steps // update_steps
    assert trainer.method.admm.rho == pytest.approx(0.5, rel=1e-9)
    assert rhos[0] < rhos[-1] == pytest.approx(0.5, rel=1e-3)


def test_rho_final_below_the_initial_rho_is_rejected():
    with pytest.raises(ValueError, match="admm_rho_final=0.0001 must be >= admm_rho=0.001"):
        pruning(admm_rho=1e-3, admm_rho_final=1e-4)
