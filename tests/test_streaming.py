"""The recipe's --streaming: an imagefolder read as a datasets IterableDataset, never loaded into memory.

The data are scikit-learn's digits written as an imagefolder (the bundled data; the Fashion-MNIST
demonstration is benchmarks/streaming.py). A streamed run must prune exactly as the in-memory
run that reads the same images in the same order (``--train_sampling_strategy sequential``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, IterableDataset
from safetensors.torch import load_file
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification, ViTImageProcessor

from hf_vitprune import PruningConfig, PruningPlan, PruningTrainer, recipe
from hf_vitprune.data import load_digits_dataset, write_imagefolder


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """Digits as train/validation imagefolders, and a tiny untrained ViT (with its processor) for 8x8 grey images."""
    root = tmp_path_factory.mktemp("digits_folder")
    splits = load_digits_dataset()
    train = write_imagefolder(splits["train"].select(range(96)), root / "train")
    validation = write_imagefolder(splits["validation"].select(range(40)), root / "validation")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8,
                       patch_size=2, num_channels=1, num_labels=10)
    model_dir = root / "tiny-vit"
    ViTForImageClassification(config).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5]).save_pretrained(model_dir)
    return train, validation, model_dir


def _arguments(digits_folder, output_dir: Path, *extra: str) -> list[str]:
    train, validation, model_dir = digits_folder
    return ["--model_name_or_path", str(model_dir), "--train_dir", str(train), "--validation_dir", str(validation),
            "--output_dir", str(output_dir), "--max_steps", "8", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "16", "--calibration_samples", "24", "--admm_update_steps", "2",
            "--target_sparsity", "0.4", "--use_cpu", "true", "--logging_steps", "2", "--disable_tqdm", "true",
            "--train_sampling_strategy", "sequential", *extra]


def test_streamed_run_prunes_as_the_in_memory_run_on_the_same_images(digits_folder, tmp_path):
    in_memory, streamed = tmp_path / "in_memory", tmp_path / "streamed"
    assert recipe.main(_arguments(digits_folder, in_memory)) == 0
    assert recipe.main(_arguments(digits_folder, streamed, "--streaming", "true")) == 0
    plan = PruningPlan.from_pretrained(streamed)
    assert plan.to_dict() == PruningPlan.from_pretrained(in_memory).to_dict()
    assert plan.kept_heads(0, 4) != list(range(4)) or plan.kept_neurons(0, 48) != list(range(48)), "must prune"
    got, expected = load_file(streamed / "model.safetensors"), load_file(in_memory / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in got:  # the same batches through the same steps: the same fine-tuned weights
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    metrics = json.loads((streamed / "eval_results.json").read_text())
    assert metrics["eval_accuracy"] == json.loads((in_memory / "eval_results.json").read_text())["eval_accuracy"]


def test_streaming_reads_the_splits_as_streams(digits_folder):
    train, validation, model_dir = digits_folder
    model_args, data_args, _, _, training_args = recipe.parse_arguments(
        _arguments(digits_folder, Path("unused"), "--streaming", "true", "--max_train_samples", "20"))
    data = recipe.load_data(data_args, model_args, seed=0)
    assert isinstance(data.train, recipe.StreamedImageClassificationData)
    assert isinstance(data.train.dataset, IterableDataset) and isinstance(data.evaluation.dataset, IterableDataset)
    assert data.labels == [str(i) for i in range(10)]
    first = [example["labels"].item() for example in data.train]
    assert len(first) == 20  # --max_train_samples takes the stream's first 20 images
    data.train.set_epoch(1)  # a shuffled stream is reshuffled each epoch, and augmented afresh
    second = [example["labels"].item() for example in data.train]
    assert sorted(second) == sorted(first) and second != first
    example = next(iter(data.evaluation))
    assert example["pixel_values"].shape == (1, 8, 8)


@pytest.mark.parametrize(("extra", "expected"), [
    (["--max_steps", "-1"], "--streaming needs --max_steps N"),
    (["--shuffle_buffer_size", "0"], "--shuffle_buffer_size 0: must be at least 1"),
])
def test_streaming_rejects_bad_arguments(digits_folder, tmp_path, capsys, extra, expected):
    status = recipe.main([*_arguments(digits_folder, tmp_path / "out"), "--streaming", "true", *extra])
    assert status == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_streaming_the_built_in_data_is_refused(tmp_path, capsys):
    status = recipe.main(["--streaming", "true", "--max_steps", "4", "--output_dir", str(tmp_path / "out")])
    assert status == 2
    assert "the built-in data sets are small and always in memory" in capsys.readouterr().err


def test_streaming_without_a_validation_split_is_refused(digits_folder, tmp_path, capsys):
    arguments = _arguments(digits_folder, tmp_path / "out", "--streaming", "true")
    index = arguments.index("--validation_dir")
    del arguments[index : index + 2]
    assert recipe.main(arguments) == 2
    err = capsys.readouterr().err
    assert "--streaming needs a validation split" in err and "Pass --validation_dir" in err
    assert not (tmp_path / "out").exists()


def _tiny_trainer(tmp_path, train_dataset, **arguments):
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8,
                       patch_size=2, num_channels=1, num_labels=3)
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                             per_device_eval_batch_size=4, **arguments)
    return PruningTrainer(model=ViTForImageClassification(config), args=args, train_dataset=train_dataset,
                          pruning_config=PruningConfig(target_sparsity=0.4, calibration_samples=10))


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"pixel_values": torch.randn(12, 1, 8, 8, generator=generator).numpy(),
                              "labels": [0, 1, 2] * 4, "path": [f"{i}.png" for i in range(12)]}).with_format("torch")


def test_calibration_takes_the_first_images_of_a_stream(tmp_path, images):
    streamed = _tiny_trainer(tmp_path, images.to_iterable_dataset().with_format("torch"), max_steps=4)
    in_memory = _tiny_trainer(tmp_path, images, max_steps=4)
    got, expected = list(streamed._calibration_batches()), list(in_memory._calibration_batches())
    assert [batch["pixel_values"].shape[0] for batch in got] == [4, 4, 2]
    assert [set(batch) for batch in got] == [{"pixel_values", "labels"}] * 3  # the unused column is dropped
    for a, b in zip(got, expected):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
