"""Resuming a PruningTrainer run: incomplete checkpoints are skipped or named, another config is refused.

Also the trainer's narration: the INFO lines that say what the pruning does, once, on the main process.
"""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

from hf_vitprune import PruningConfig, PruningTrainer, model_stats
from hf_vitprune.state import STATE_JSON, STATE_TENSORS, PruningState, config_differences, missing_files

LOGGER = "hf_vitprune.trainer"


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                               intermediate_size=37, image_size=16, patch_size=4, num_labels=5))


def random_images(count: int = 64) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict({
        "pixel_values": torch.randn(count, 3, 16, 16, generator=generator).numpy(),
        "labels": torch.randint(0, 5, (count,), generator=generator).numpy(),
    }).with_format("torch")


def arguments(output_dir, **overrides) -> TrainingArguments:
    # 8 steps: the search saves admm/checkpoint-2 and -4, fine-tuning finetune/checkpoint-6 and -8
    values = dict(max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3, report_to=[], save_strategy="steps",
                  save_steps=2, disable_tqdm=True, seed=0, use_cpu=True, logging_steps=2)
    values.update(overrides)
    return TrainingArguments(str(output_dir), **values)


def pruning(**overrides) -> PruningConfig:
    values = dict(target_sparsity=0.4, calibration_samples=16, admm_update_steps=1, admm_fraction=0.5)  # ADMM, not one shot
    values.update(overrides)
    return PruningConfig(**values)


def trainer(output_dir, config=None, **overrides) -> PruningTrainer:
    return PruningTrainer(model=tiny_vit(), args=arguments(output_dir, **overrides), train_dataset=random_images(),
                          pruning_config=config or pruning())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: its final weights, and a pristine copy of its checkpoint tree."""
    output = tmp_path_factory.mktemp("reference")
    run = trainer(output)
    run.train()
    return run.plan, {name: value.clone() for name, value in run.model.state_dict().items()}, output


def copy_run(reference, destination):
    shutil.copytree(reference[2], destination)
    return destination


def assert_same_final_model(run, reference):
    plan, weights, _ = reference
    assert run.plan == plan
    got = run.model.state_dict()
    assert got.keys() == weights.keys()
    for name in weights:
        torch.testing.assert_close(got[name], weights[name], rtol=0, atol=0, msg=name)


def skipped_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("Skipping")]


# --------------------------------------------------------------------------- an interrupted save


@pytest.mark.parametrize("killed, resumed_from", [
    ("admm/checkpoint-4", "admm/checkpoint-2"),  # the search folder's previous checkpoint
    ("finetune/checkpoint-6", "admm/checkpoint-4"),  # no complete fine-tuning checkpoint: the search's last one
])
def test_a_kill_between_the_weights_and_the_pruning_state_falls_back_to_the_last_complete_checkpoint(
        tmp_path, reference, monkeypatch, caplog, killed, resumed_from):
    save = PruningState.save

    def killed_while_saving(self, directory):
        if str(directory).endswith(killed):
            raise KeyboardInterrupt("killed while saving")
        return save(self, directory)

    monkeypatch.setattr(PruningState, "save", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path).train()
    monkeypatch.setattr(PruningState, "save", save)
    partial = tmp_path / killed
    assert (partial / "model.safetensors").is_file() and (partial / "trainer_state.json").is_file()
    assert missing_files(partial) == [STATE_JSON, STATE_TENSORS]

    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(partial))} holds no {STATE_JSON}"):
        trainer(tmp_path).train(resume_from_checkpoint=str(partial))  # an explicit path is not second-guessed

    caplog.set_level(logging.INFO, logger=LOGGER)
    resumed = trainer(tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert skipped_lines(caplog) == [
        f"Skipping checkpoint {partial}: it lacks {STATE_JSON}, {STATE_TENSORS} (its save was interrupted?)."]
    assert any(f"resuming the admm phase from {tmp_path / resumed_from}" in r.getMessage() for r in caplog.records)
    assert_same_final_model(resumed, reference)  # also from the search's last step, where it ends at once


def test_the_newest_checkpoint_without_pruning_state_is_skipped_for_the_previous_one(tmp_path, reference, caplog):
    copy_run(reference, tmp_path / "run")
    newest = tmp_path / "run" / "finetune" / "checkpoint-8"
    (newest / STATE_JSON).unlink()
    (newest / STATE_TENSORS).unlink()
    caplog.set_level(logging.INFO, logger=LOGGER)
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    assert skipped_lines(caplog) == [
        f"Skipping checkpoint {newest}: it lacks {STATE_JSON}, {STATE_TENSORS} (its save was interrupted?)."]
    assert any(f"Resuming from {tmp_path / 'run' / 'finetune' / 'checkpoint-6'}" in r.getMessage()
               for r in caplog.records)
    assert_same_final_model(resumed, reference)


def test_no_complete_checkpoint_lists_what_was_skipped(tmp_path, reference):
    copy_run(reference, tmp_path / "run")
    for checkpoint in (tmp_path / "run").glob("*/checkpoint-*"):
        (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"No complete PruningTrainer checkpoint.*checkpoint-8 \(lacks the model "
                                         r"weights.*checkpoint-2 \(lacks.*Train from the start"):
        trainer(tmp_path / "run").train(resume_from_checkpoint=True)


# --------------------------------------------------------------------------- pruning_state.safetensors missing


def test_a_search_checkpoint_without_its_tensors_is_named_or_skipped(tmp_path, reference, caplog):
    copy_run(reference, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "finetune")
    broken = tmp_path / "run" / "admm" / "checkpoint-4"
    (broken / STATE_TENSORS).unlink()  # pruning_state.json is still there

    # an explicit path: a clear error naming the file (it used to be an AttributeError on 'penalty')
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(broken / STATE_TENSORS))} is missing"):
        trainer(tmp_path / "run").train(resume_from_checkpoint=str(broken))

    # True: skipped, and the search resumes from checkpoint-2 and ends as the uninterrupted run did
    caplog.set_level(logging.INFO, logger=LOGGER)
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    assert skipped_lines(caplog) == [
        f"Skipping checkpoint {broken}: it lacks {STATE_TENSORS} (its save was interrupted?)."]
    assert_same_final_model(resumed, reference)


# --------------------------------------------------------------------------- another config


@pytest.mark.parametrize("change, message", [
    ({"target_sparsity": 0.5}, "target_sparsity: 0.4 in the checkpoint, 0.5 now"),
    ({"damping": 0.5}, "damping: 0.85 in the checkpoint, 0.5 now"),
    ({"min_heads_per_layer": 2, "distillation_weight": 0.0},
     "min_heads_per_layer: 1 in the checkpoint, 2 now; distillation_weight: 0.5 in the checkpoint, 0.0 now"),
])
@pytest.mark.parametrize("where", [True, "admm/checkpoint-2", "finetune/checkpoint-6"])
def test_resuming_with_another_config_is_refused(tmp_path, reference, change, message, where):
    copy_run(reference, tmp_path / "run")
    run = trainer(tmp_path / "run", pruning(**change))
    resume = where if where is True else str(tmp_path / "run" / where)
    with pytest.raises(ValueError, match=rf"written with another PruningConfig.*Differences: {re.escape(message)}\. "
                                         rf"Resume with the checkpoint's config.*or start the new config in a new "
                                         rf"output_dir"):
        run.train(resume_from_checkpoint=resume)


def test_checkpoints_store_the_config_they_were_written_with(reference):
    for checkpoint in reference[2].glob("*/checkpoint-*"):
        stored = json.loads((checkpoint / STATE_JSON).read_text())["config"]
        assert PruningConfig.from_dict(stored) == pruning()


def test_checkpoints_written_before_the_config_was_stored_still_resume(tmp_path, reference):
    copy_run(reference, tmp_path / "run")
    for checkpoint in (tmp_path / "run").glob("*/checkpoint-*"):
        path = checkpoint / STATE_JSON
        meta = json.loads(path.read_text())
        del meta["config"]
        path.write_text(json.dumps(meta))
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "finetune" / "checkpoint-6"))
    assert_same_final_model(resumed, reference)


def test_config_differences_compares_options_at_their_defaults():
    stored = pruning().to_dict()
    del stored["method_options"]["damping"]  # an option the method gained after the checkpoint was written
    assert config_differences(stored, pruning().to_dict()) == []
    assert config_differences(stored, pruning(damping=0.5).to_dict()) == [
        "damping: 0.85 in the checkpoint, 0.5 now"]


# --------------------------------------------------------------------------- narration


def test_the_trainer_says_what_the_pruning_does_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    run = trainer(tmp_path / "run", max_steps=6, save_steps=2)
    run.train()
    run.save_model(str(tmp_path / "model"))
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    dense, pruned = run.dense_stats, model_stats(run.model)
    heads = (sum(layer.heads for layer in pruned.layers), sum(layer.heads for layer in dense.layers))
    neurons = (sum(layer.neurons for layer in pruned.layers), sum(layer.neurons for layer in dense.layers))
    expected = [
        "Pruning with gohsp: search for 3 steps, then fine-tuning for 3 steps (budget: remove 40% of the parameters)",
        f"Compacted: kept {heads[0]}/{heads[1]} heads, {neurons[0]}/{neurons[1]} MLP neurons, {pruned.params:,} "
        f"parameters ({100 * pruned.params / dense.params:.1f}% of {dense.params:,}), {pruned.flops:,} FLOPs per "
        f"image ({100 * pruned.flops / dense.flops:.1f}% of {dense.flops:,})",
        f"Saved the pruned model, its card and pruning_report.json to {tmp_path / 'model'}",
    ]
    assert lines == expected  # once each: checkpoint saves say nothing


def test_narration_follows_the_log_level_and_replicas_stay_quiet(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=LOGGER)  # restores the logger's level afterwards
    trainer(tmp_path / "quiet", max_steps=4, save_strategy="no", log_level="error").train()
    assert [r for r in caplog.records if r.name == LOGGER] == []

    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(TrainingArguments, "should_log", property(lambda self: False))  # as on a replica
    trainer(tmp_path / "replica", max_steps=4, save_strategy="no").train()
    assert [r for r in caplog.records if r.name == LOGGER] == []
