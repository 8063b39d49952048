"""Issue 24, what a user made is never lost or misdescribed: a model card or report built from another model's
pruning_report.json is refused; data errors name the file, the label and the fix before or where they happen;
the quickstart's model works in ``transformers.pipeline``."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from hf_vitprune import PruningConfig, PruningPlan, apply_plan
from hf_vitprune.cli import main
from hf_vitprune.reporting import REPORT_FILE, PruningReport, write_model_card
from hf_vitprune.surgery import add_token_pruning
from test_bad_inputs_cli import CLASSES, write_image_folders  # the same seeded image folders

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=8, intermediate_size=37, image_size=16,
            patch_size=4, num_labels=3)


def _files(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """gohsp/: heads pruned to 2 of 8 in layer 0, with its report and card; tokens/: 8 of 8 heads and a token
    path; heads/: other heads pruned; each of these two with gohsp/'s report and card copied in. dense/: no token
    path, with the report and card of a token-pruned model."""
    root = tmp_path_factory.mktemp("cards")
    torch.manual_seed(0)
    dense = ViTForImageClassification(ViTConfig(**TINY))
    gohsp = apply_plan(copy.deepcopy(dense), PruningPlan(heads={0: [0, 1]}))
    gohsp.save_pretrained(root / "gohsp")
    report = PruningReport.from_models(dense, gohsp, pruning_config=PruningConfig(target_sparsity=0.2),
                                       created="2025-01-01T00:00:00+00:00")
    write_model_card(root / "gohsp", report)
    tokens = add_token_pruning(copy.deepcopy(dense), [0.5])
    tokens.save_pretrained(root / "tokens")
    apply_plan(copy.deepcopy(dense), PruningPlan(heads={1: [0, 1]})).save_pretrained(root / "heads")
    for other in ("tokens", "heads"):
        for name in (REPORT_FILE, "README.md"):
            shutil.copy(root / "gohsp" / name, root / other / name)
    dense.save_pretrained(root / "dense")  # with the token-pruned model's report and card
    write_model_card(root / "dense", PruningReport.from_models(
        dense, tokens, pruning_config=PruningConfig(method="spvit_tokens", target_flops_reduction=0.3)))
    return root


@pytest.mark.parametrize("command", ["card", "report"])
@pytest.mark.parametrize("model, names", [
    ("tokens", ["the model has a token path (token_pruning in config.json), but the report's 'gohsp' run recorded "
                "a model without one"]),
    ("heads", ["layer 0: the report records 2 attention heads, the model has 8"]),
    ("dense", ["the report's 'spvit_tokens' run recorded a token-pruned model, but the model has no token path"]),
])
def test_a_report_of_another_model_is_refused(models, tmp_path, capsys, command, model, names):
    """The card would claim gohsp and 2 of 8 heads for a model with 8 of 8: refused, naming the mismatch, and the
    directory's files stay byte for byte as they were."""
    directory = tmp_path / model
    shutil.copytree(models / model, directory)
    before = _files(directory)
    argv = ["card", str(directory)] if command == "card" else ["report", str(directory), "--no-speed"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{REPORT_FILE} does not describe the model" in err and "belongs to another model" in err
    for name in names:
        assert name in err, err.split(": error: ")[-1]
    assert _files(directory) == before


def test_the_card_of_the_report_own_model_is_still_written(models, tmp_path, capsys):
    directory = tmp_path / "gohsp"
    shutil.copytree(models / "gohsp", directory)
    (directory / "README.md").unlink()
    assert main(["card", str(directory)]) == 0
    assert "keeping 10 of 16 attention heads" in (directory / "README.md").read_text()


# ------------------------------------------------------------------ data errors named up front or where they happen


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train/ and validation/ imagefolders of 16x16 PNGs, one of train/'s cut short; a 3-class tiny ViT."""
    from transformers import ViTImageProcessor

    root = tmp_path_factory.mktemp("data")
    write_image_folders(root, {"train": 3, "validation": 2})
    truncated = root / "train" / "square" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(**TINY)).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "vit")
    return root


def _arguments(folders, **data):
    from hf_vitprune.recipe import DataArguments, ModelArguments

    return DataArguments(**data), ModelArguments(model_name_or_path=str(folders / "vit"))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_truncated_image_is_named_with_the_fix(folders, monkeypatch, tmp_path, streaming):
    """PIL's "image file is truncated" named no file; now the file, the split and the fix are named."""
    from hf_vitprune.recipe import load_data

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = load_data(*_arguments(folders, train_dir=str(folders / "train"), validation_dir=str(folders / "validation"),
                                 streaming=streaming))
    examples = iter(data.train) if streaming else (data.train[i] for i in range(len(data.train)))
    with pytest.raises(ValueError) as error:
        for example in examples:
            assert example["pixel_values"].shape == (3, 16, 16)
    message = str(error.value)
    assert str(folders / "train" / "square" / "1.png") in message and "train split" in message
    assert "truncated" in message and "Replace the file with a readable image or delete it" in message
    assert [example["labels"] for example in data.evaluation][:1]  # the good split still reads


def _labelled(names_train, labels_train, names_validation, labels_validation):
    import numpy as np
    from datasets import ClassLabel, Dataset, DatasetDict
    from PIL import Image

    def split(names, labels):
        images = [Image.fromarray(np.full((16, 16, 3), 30 * i, dtype=np.uint8)) for i in range(len(labels))]
        return Dataset.from_dict({"image": images, "label": labels}).cast_column("label", ClassLabel(names=names))

    return DatasetDict(train=split(names_train, labels_train), validation=split(names_validation, labels_validation))


@pytest.mark.parametrize("split, raw", [  # splits that do not name themselves are called by their role
    ("training", lambda: _labelled(list(CLASSES), [0, 1, 5, 2], list(CLASSES), [0, 1])),
    ("evaluation", lambda: _labelled(list(CLASSES), [0, 1, 2, 2], list(CLASSES), [0, -1])),  # an unlabelled split
])
def test_labels_the_model_has_no_class_for_are_refused_before_the_run(folders, monkeypatch, tmp_path, capsys, split, raw):
    """A label >= num_labels (or -1) was torch's "Target 5 is out of bounds" mid-run; now `prune` stops before
    any work, naming the split, the class count, the label and the fix, and writes nothing."""
    import hf_vitprune.recipe as recipe

    monkeypatch.setattr(recipe, "_load_raw", lambda data_args, model_args: raw())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    status = main(["prune", "--model_name_or_path", str(folders / "vit"), "--dataset_name", "local",
                   "--output_dir", str(out), "--max_steps", "2", "--use_cpu", "true"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    bad = "5" if split == "training" else "-1"
    assert f"of the {split} split are not classes of the model, which classifies 3 classes: {bad}" in err, err
    assert "--label_column_name" in err and "--validation_split_name" in err
    assert not out.exists() or not any(out.iterdir())


def test_a_streamed_label_the_model_has_no_class_for_is_refused_as_read(folders):
    """A stream cannot be read through first: its labels are checked as they are read, naming the example."""
    from hf_vitprune.recipe import StreamedImageClassificationData
    from transformers import ViTImageProcessor

    stream = _labelled(list(CLASSES), [0, 1, 5, 2], list(CLASSES), [0])["train"].to_iterable_dataset()
    data = StreamedImageClassificationData(stream, ViTImageProcessor(size={"height": 16, "width": 16}), "image",
                                           "label", augment=True, num_labels=3)
    examples = iter(data)
    assert [int(next(examples)["labels"]) for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match=r"label 5 of example 2 of the training split is not a class of the model, "
                                         r"which classifies 3 classes\. Labels must be class ids 0\.\.2"):
        next(examples)


# ------------------------------------------------------------------ the quickstart's model in pipeline()


def test_the_quickstart_model_works_in_pipeline(tmp_path, monkeypatch):
    """pipeline() (and the Hub widget the card's pipeline_tag promises) converts every image to RGB; the offline
    default's 1-channel model failed there with "mean must have 3 elements". Its pruned model now takes RGB and the
    pipeline labels a grey digit as the model labels the training pixels."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from transformers import AutoModelForImageClassification, pipeline

    from hf_vitprune.recipe import main as recipe_main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert recipe_main(["--output_dir", str(out), "--dense_cache_dir", str(tmp_path / "dense"), "--dense_epochs", "1",
                        "--max_train_samples", "64", "--max_eval_samples", "16", "--max_steps", "2",
                        "--calibration_samples", "8", "--per_device_train_batch_size", "32", "--use_cpu", "true",
                        "--disable_tqdm", "true", "--report_to", "none"]) == 0
    grey = np.round(load_digits().images[:4] / 16.0 * 255).astype(np.uint8)
    images = [Image.fromarray(image, mode="L").convert("RGB") for image in grey]
    classify = pipeline("image-classification", model=str(out), device="cpu")
    answers = classify(images, top_k=1)
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    pixels = torch.tensor((grey / 255.0 - 0.5) / 0.5, dtype=torch.float32)[:, None].expand(-1, 3, -1, -1)
    with torch.no_grad():
        expected = [model.config.id2label[i] for i in model(pixel_values=pixels).logits.argmax(-1).tolist()]
    assert [answer[0]["label"] for answer in answers] == expected
    assert all(0 <= answer[0]["score"] <= 1 for answer in answers)


def test_a_dense_model_cached_for_one_channel_digits_is_refused_with_the_fix(tmp_path, monkeypatch, capsys):
    """The cache an older version wrote holds a 1-channel model; reused, it would fail on the RGB digits mid-run."""
    from hf_vitprune.recipe import main as recipe_main

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "dense"
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=37, image_size=8, patch_size=2, num_channels=1,
                                        num_labels=10)).save_pretrained(cache)
    before = _files(cache)
    out = tmp_path / "out"
    assert recipe_main(["--output_dir", str(out), "--dense_cache_dir", str(cache), "--max_steps", "2",
                        "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none"]) == 1
    err = capsys.readouterr().err
    assert f"the dense model cached in {cache} takes 1-channel images, but the built-in data are 3-channel" in err
    assert f"Delete {cache} to train it again, or pass --dense_cache_dir" in err
    assert _files(cache) == before and (not out.exists() or not any(out.iterdir()))
