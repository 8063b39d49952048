"""benchmarks/streaming.py's parts that decide its figures, on tiny slices: the imagefolders are the slice and are
reused; read in stored order, a plain one goes class by class while the sharded one mixes the classes; the dense
model is trained on exactly the pixels and label ids the recipe later reads from them; the run comparison tells
plans apart; the table shows what was measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Image, load_dataset
from safetensors.torch import save_file
from transformers import ViTImageProcessor

from benchmarks import streaming
from hf_vitprune.data import (FASHION_MNIST_LABELS, _dataset, imagefolder_class_name, load_digits_dataset,
                              write_imagefolder)


def _pngs(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.png"))


def _fashion_like(count: int):
    """A split shaped like Fashion-MNIST's (8-bit 28x28 grey images, its class names, "/" included), built in memory."""
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (count, 1, 28, 28)).astype(np.float32) / 255
    labels = generator.permutation(np.arange(count) % 10)
    split = _dataset(images, labels, FASHION_MNIST_LABELS)
    return {"train": split, "validation": split}


def _stream(directory: Path):
    """The imagefolder in the order the recipe reads it, undecoded (so each example keeps its path)."""
    stream = load_dataset("imagefolder", data_files={"train": f"{directory}/**"}, streaming=True)["train"]
    return stream.cast_column("image", Image(decode=False))


def test_imagefolders_hold_the_first_images_and_are_reused(tmp_path):
    splits = load_digits_dataset()
    folders = streaming.write_folders(splits, 30, 12, tmp_path, shard_images=8)
    assert not folders["reused"]
    assert len(_pngs(folders["train"])) == 30 and len(_pngs(folders["validation"])) == 12
    assert sorted(p.name for p in folders["train"].iterdir()) == [f"shard-0000{k}" for k in range(4)]
    assert sorted(p.name for p in folders["validation"].iterdir()) == ["shard-00000", "shard-00001"]
    stamps = {p: p.stat().st_mtime_ns for p in _pngs(folders["train"])}
    again = streaming.write_folders(splits, 30, 12, tmp_path, shard_images=8)
    assert again["reused"] and again["train"] == folders["train"]
    assert {p: p.stat().st_mtime_ns for p in _pngs(folders["train"])} == stamps  # not rewritten
    other = streaming.write_folders(splits, 20, 12, tmp_path, shard_images=8)  # other counts: another pair
    assert not other["reused"] and len(_pngs(other["train"])) == 20
    assert len(_pngs(folders["train"])) == 30  # the first pair is still there
    with pytest.raises(SystemExit, match="--validation_images 9999"):
        streaming.write_folders(splits, 20, 9999, tmp_path)


def test_a_plain_imagefolder_streams_class_by_class(tmp_path):
    folders = streaming.write_folders(_fashion_like(40), 40, 5, tmp_path, shard_images=0)
    labels = [example["label"] for example in _stream(folders["train"])]
    assert labels == sorted(labels) and len(set(labels)) == 10  # why the benchmark writes shards
    assert streaming.imagefolder_labels(folders) == sorted(imagefolder_class_name(n) for n in FASHION_MNIST_LABELS)


def test_folders_of_unequal_depth_are_refused_before_any_run(tmp_path):
    splits = _fashion_like(20)
    write_imagefolder(splits["train"], tmp_path / "train" / "shard-00000")
    write_imagefolder(splits["validation"], tmp_path / "validation")
    with pytest.raises(SystemExit, match="datasets infers no class labels"):
        streaming.imagefolder_labels({"train": tmp_path / "train", "validation": tmp_path / "validation"})


def test_dense_training_sees_the_images_and_label_ids_the_recipe_reads_in_mixed_order(tmp_path):
    splits = _fashion_like(40)
    folders = streaming.write_folders(splits, 40, 5, tmp_path, shard_images=8)
    labels = streaming.imagefolder_labels(folders)
    assert labels == sorted(labels) and "T-shirt-top" in labels  # the imagefolder numbers sorted class names
    builtin = list(splits["train"].features["labels"].names)
    relabelled = streaming._Relabelled(splits["train"], 40, [labels.index(imagefolder_class_name(n)) for n in builtin])
    processor = ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5], image_std=[0.5])
    order = []
    for example in _stream(folders["train"]):
        path = Path(example["image"]["path"])
        index = 8 * int(path.parent.parent.name.removeprefix("shard-")) + int(path.stem)
        order.append(index)
        image = Image().decode_example(example["image"]).convert("L")
        assert example["label"] == relabelled[index]["labels"].item()
        pixels = torch.as_tensor(processor(image, return_tensors="np")["pixel_values"][0])
        torch.testing.assert_close(pixels, relabelled[index]["pixel_values"], rtol=0, atol=1e-6)
    # read in stored order, shard k is images 8k .. 8k+7 (class by class within it): every batch mixes classes
    assert [sorted(order[k : k + 8]) for k in range(0, 40, 8)] == [list(range(k, k + 8)) for k in range(0, 40, 8)]
    assert len({relabelled[i]["labels"].item() for i in order[:8]}) > 1


def _run_dir(path: Path, plan: dict, weight: float) -> Path:
    path.mkdir()
    (path / "pruning_plan.json").write_text(json.dumps(plan))
    save_file({"w": torch.full((2, 2), weight)}, path / "model.safetensors")
    return path


def test_runs_are_compared_by_plan_and_weights(tmp_path):
    plan = {"layers": [{"heads": [0, 2], "neurons": [1, 5]}]}
    a = _run_dir(tmp_path / "a", plan, 1.0)
    b = _run_dir(tmp_path / "b", plan, 1.25)
    c = _run_dir(tmp_path / "c", {"layers": [{"heads": [0, 1], "neurons": [1, 5]}]}, 1.0)
    assert streaming.compare_runs(a, b) == {"plans_identical": True, "max_weight_difference": 0.25}
    assert streaming.compare_runs(a, c) == {"plans_identical": False, "max_weight_difference": 0.0}


def test_table_shows_each_run_and_the_comparison(tmp_path):
    def run(mode, first, cache_bytes, files):
        return {"mode": mode, "wall_seconds": 100.04, "first_step_seconds": first, "peak_rss_bytes": 700 * 2**20,
                "cache": {"bytes": cache_bytes, "files": files}, "eval_accuracy": 0.81234}

    results = {"runs": [run("in_memory", 12.34, 5 * 2**20 + 2**19, 6), run("streaming", None, 0, 1)],
               "comparison": {"plans_identical": False}}
    rows = streaming.table_rows(results)
    assert rows[1] == ["in_memory", "100.0", "12.3", "5.5 MiB (6 files)", "700", "81.23%", "no"]
    assert rows[2] == ["streaming", "100.0", "-", "0 B (1 files)", "700", "81.23%", "no"]
    text = streaming.markdown_table(rows)
    assert text.splitlines()[1] == "|---|---|---|---|---|---|---|" and len(text.splitlines()) == 4
    assert streaming.directory_size(tmp_path / "absent") == {"bytes": 0, "files": 0}


def test_the_first_training_log_is_recognised():
    assert streaming.is_training_log("{'loss': '3.474', 'grad_norm': '6.418', 'epoch': '0.1'}\n")
    assert not streaming.is_training_log("{'dense_loss': '2.171', 'dense_accuracy': '0.26'}\n")
    assert not streaming.is_training_log("INFO: 'loss' is logged every 50 steps\n")
