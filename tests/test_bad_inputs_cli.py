"""Bad input to `hf-vitprune prune`, `report` and `card`: exit status, a message naming the problem and the
fix, and nothing half-written in the output directory. Each row runs the CLI in-process; the recipe fails
before it trains."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Value
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

import hf_vitprune.reporting
from hf_vitprune.cli import main

CLASSES = ("circle", "square", "stripes")


def write_image_folders(root, counts: dict[str, int]) -> None:
    """Seeded random 16x16 RGB PNGs in ``root/<split>/<class>/``, ``counts[split]`` per class of CLASSES."""
    rng = np.random.default_rng(0)
    for split, count in counts.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    write_image_folders(root, {"train": 4, "validation": 2})
    (root / "empty" / "circle").mkdir(parents=True)
    (root / "empty" / "circle" / "notes.txt").write_text("no images here")
    for name, labels in (("tiny-vit", 3), ("tiny-vit-2", 2)):
        torch.manual_seed(0)
        config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           image_size=16, patch_size=4, num_labels=labels)
        ViTForImageClassification(config).save_pretrained(root / name)
        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / name)
    shutil.copytree(root / "tiny-vit", root / "no-processor")
    (root / "no-processor" / "preprocessor_config.json").unlink()
    (root / "existing").mkdir()
    (root / "existing" / "model.safetensors").write_text("an earlier run")
    (root / "not-a-checkpoint" / "checkpoint-3").mkdir(parents=True)
    (root / "bad.yaml").write_text("target_sparsity: [0.4\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "pruned").mkdir()
    (root / "pruned" / "pruning_report.json").write_text("{}")
    return root


def base(files, out, *extra):
    return ["prune", "--model_name_or_path", str(files / "tiny-vit"), "--train_dir", str(files / "train"),
            "--validation_dir", str(files / "validation"), "--output_dir", str(out), "--max_steps", "2",
            "--use_cpu", "true", "--disable_tqdm", "true", *extra]


# (id, argv builder, exit status, what stderr must name, the fix stderr must name)
ROWS = [
    ("resume-missing-path", lambda f, o: base(f, o, "--resume_from_checkpoint", str(f / "nope")), 1,
     ["--resume_from_checkpoint", "no such directory"], "checkpoint-N"),
    ("resume-not-ours", lambda f, o: base(f, o, "--resume_from_checkpoint", str(f / "not-a-checkpoint" / "checkpoint-3")),
     1, ["not a PruningTrainer checkpoint", "pruning_state.json"], "checkpoint-N"),
    ("resume-true-nothing", lambda f, o: base(f, o, "--resume_from_checkpoint", "true"), 1,
     ["no checkpoint found"], "run without it"),
    ("output-dir-not-empty", lambda f, o: base(f, f / "existing"), 1,
     ["already exists and is not empty"], "--overwrite_output_dir"),
    ("image-column", lambda f, o: base(f, o, "--image_column_name", "img"), 2,
     ["--image_column_name 'img'", "image, label"], "Pass --image_column_name"),
    ("label-column", lambda f, o: base(f, o, "--label_column_name", "target"), 2,
     ["--label_column_name 'target'", "image, label"], "Pass --label_column_name"),
    ("empty-train-dir", lambda f, o: base(f, o, "--train_dir", str(f / "empty")), 1,
     ["holds no images"], "<class name>/<image>"),
    ("missing-train-dir", lambda f, o: base(f, o, "--train_dir", str(f / "nowhere")), 1,
     ["not a directory"], "<class name>/<image>"),
    ("missing-validation-dir", lambda f, o: base(f, o, "--validation_dir", str(f / "nowhere")), 1,
     ["--validation_dir", "not a directory"], "<class name>/<image>"),
    ("unreachable-dataset", lambda f, o: ["prune", "--model_name_or_path", str(f / "tiny-vit"), "--dataset_name",
                                          "someone/no-such-dataset", "--output_dir", str(o)], 1,
     ["someone/no-such-dataset"], "--train_dir"),
    ("dataset-without-model", lambda f, o: ["prune", "--train_dir", str(f / "train"), "--output_dir", str(o)], 2,
     ["need --model_name_or_path"], "--model_name_or_path"),
    ("more-labels-than-head", lambda f, o: base(f, o, "--model_name_or_path", str(f / "tiny-vit-2")), 1,
     ["3 labels", "classifies 2 classes", "do not fit"], "--ignore_mismatched_sizes true"),
    ("missing-model", lambda f, o: base(f, o, "--model_name_or_path", str(f / "no-model")), 1,
     ["could not load the model config", "no-model"], "--model_name_or_path"),
    ("no-processor", lambda f, o: base(f, o, "--model_name_or_path", str(f / "no-processor")), 1,
     ["could not load an image processor"], "--image_processor_name"),
    ("train-val-split", lambda f, o: base(f, o, "--train_val_split", "1.5"), 2,
     ["--train_val_split 1.5"], "(0, 1)"),
    ("do-predict", lambda f, o: base(f, o, "--do_predict", "true"), 2, ["--do_predict is not supported"],
     "Trainer.predict"),
    ("do-eval-false", lambda f, o: base(f, o, "--do_eval", "false"), 2, ["--do_eval false is not supported"],
     "drop the flag"),
    ("config-missing", lambda f, o: ["prune", "--config", str(f / "nope.yaml")], 2, ["no such file"], "--config"),
    ("config-bad-yaml", lambda f, o: ["prune", "--config", str(f / "bad.yaml"), "--output_dir", str(o)], 2,
     ["not valid YAML"], "--config"),
    ("config-not-mapping", lambda f, o: ["prune", "--config", str(f / "list.yaml"), "--output_dir", str(o)], 2,
     ["must hold a mapping"], "argument names"),
    ("config-no-path", lambda f, o: ["prune", "--config"], 2, ["--config needs a YAML file path"], "--config"),
    ("builtin-unknown", lambda f, o: ["prune", "--builtin_dataset", "cifar", "--output_dir", str(o)], 2,
     ["--builtin_dataset 'cifar'"], "digits or fashion_mnist"),
    ("method-option-of-other-method", lambda f, o: base(f, o, "--method", "magnitude", "--damping", "0.5"), 2,
     ["--damping is an option of gohsp"], "--method gohsp"),
    ("push-without-token", lambda f, o: base(f, o, "--push_to_hub", "true", "--hub_model_id", "me/x"), 1,
     ["--push_to_hub needs a Hub token"], "--hub_token"),
    ("push-unreachable-endpoint",
     lambda f, o: base(f, o, "--push_to_hub", "true", "--hub_model_id", "me/x", "--hub_token", "hf_x"), 1,
     ["could not reach the Hugging Face Hub at http://127.0.0.1:9"], "HF_ENDPOINT"),
    ("push-offline", lambda f, o: base(f, o, "--push_to_hub", "true", "--hub_model_id", "me/x", "--hub_token", "hf_x"), 1,
     ["HF_HUB_OFFLINE is set"], "unset it"),
    ("unknown-flag", lambda f, o: base(f, o, "--bogus_flag", "1"), 2, ["--bogus_flag"], "usage: hf-vitprune prune"),
    ("report-cuda-on-cpu", lambda f, o: ["report", str(f / "tiny-vit"), "--device", "cuda", "--repeats", "1"], 1,
     ["--device cuda", "no usable cuda device"], "--device cpu"),
    ("report-bad-device", lambda f, o: ["report", str(f / "tiny-vit"), "--device", "gpu0", "--repeats", "1"], 1,
     ["--device gpu0", "not a device name"], "cpu, cuda"),
    ("card-read-only", lambda f, o: ["card", str(f / "pruned")], 1, ["cannot write the card into", "pruned"],
     "writable"),
]


@pytest.mark.parametrize("name, build, status, problem, fix", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input(name, build, status, problem, fix, files, tmp_path, monkeypatch, capsys):
    if name == "report-cuda-on-cpu":  # CPU-only torch, also on a machine with a GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    if name in ("push-without-token", "push-unreachable-endpoint"):
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    if name == "push-unreachable-endpoint":  # a closed port on this machine: the connection is refused at once
        import huggingface_hub.hf_api

        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", "http://127.0.0.1:9")
    if name == "card-read-only":  # root ignores permission bits: the file system says no instead
        def read_only(directory, **changes):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(directory))

        monkeypatch.setattr(hf_vitprune.reporting, "rerender_model_card", read_only)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    existing = sorted(str(path) for path in files.rglob("*"))
    assert main(build(files, out)) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in problem:
        assert text in err, (text, err)
    assert fix in err, (fix, err)
    if name == "push-unreachable-endpoint":  # fails after the data and model loaded (their progress bars)
        tail = err[err.index("hf-vitprune prune: error: "):]
        assert len(tail.strip().splitlines()) == 1, err  # one line, and the last thing printed
    elif status == 1 and build(files, out)[0] == "prune":
        assert err.startswith("hf-vitprune prune: error: ") and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir()), "nothing may be written for a failed run"
    assert sorted(str(path) for path in files.rglob("*")) == existing, "the inputs must stay as they were"


def test_string_labels_and_a_one_channel_model(files, tmp_path, monkeypatch):
    """Labels that are not a ClassLabel get a label list; a 1-channel model gets greyscale images."""
    from hf_vitprune.recipe import DataArguments, ModelArguments, load_data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = tmp_path / "grey-vit"
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=37, image_size=16, patch_size=4, num_channels=1,
                                         num_labels=2)).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(model_dir)
    images = [Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)) for i in range(6)]
    raw = Dataset.from_dict({"image": images, "label": ["cat", "dog"] * 3})
    raw = raw.cast_column("label", Value("string"))
    raw.save_to_disk(tmp_path / "ds")
    from datasets import load_from_disk
    import hf_vitprune.recipe as recipe

    monkeypatch.setattr(recipe, "_load_raw", lambda data_args, model_args: DatasetDict(train=load_from_disk(str(tmp_path / "ds"))))
    data = load_data(DataArguments(dataset_name="local", train_val_split=0.5),
                     ModelArguments(model_name_or_path=str(model_dir)))
    assert data.labels == ["cat", "dog"]
    example = data.train[0]
    assert example["pixel_values"].shape == (1, 16, 16)
    assert int(example["labels"]) in (0, 1)


# --------------------------------------------------------------------------- what `prune --help` says runs

HELP_DEFAULTS = ("output_dir", "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "learning_rate", "weight_decay", "warmup_steps", "logging_steps", "eval_strategy", "save_strategy",
                 "seed")


def _shown_defaults(text: str) -> dict[str, str]:
    """``{flag: default}`` of a help text whose every option's help is one line (on the flag's line or the next)."""
    import re

    shown, flag = {}, None
    for line in text.splitlines():
        if line.startswith("  --"):
            flag = re.match(r"  --(\w+)", line).group(1)
        default = re.search(r"\(default: (.*)\)$", line)
        if default and flag is not None:
            shown[flag] = default.group(1)
    return shown


@pytest.mark.parametrize("argv", [[], ["--method", "ofb"]], ids=["default-method", "ofb"])
def test_prune_help_shows_the_defaults_that_run(argv, monkeypatch, capsys):
    """Each default --help shows is the value of the TrainingArguments the recipe builds from that command."""
    from hf_vitprune.recipe import parse_arguments

    monkeypatch.setenv("COLUMNS", "2000")  # one line per option
    assert main(["prune", *argv, "--help"]) == 0
    shown = _shown_defaults(capsys.readouterr().out)
    training = parse_arguments(argv)[-1]
    for name in HELP_DEFAULTS:
        value = getattr(training, name)
        value = getattr(value, "value", value)  # the strategies are enums
        assert name in shown, name
        assert type(value)(shown[name]) == value, (name, shown[name], value)
    assert training.save_strategy == "no" and training.learning_rate == 2e-3 and training.seed == 0


@pytest.mark.parametrize("argv, strategy", [
    (["--save_steps", "3"], "steps"),
    (["--save_steps=3"], "steps"),
    (["--save_steps", "3", "--save_strategy", "epoch"], "epoch"),
    ([], "no"),
])
def test_save_steps_alone_saves_every_n_steps(argv, strategy):
    """As in transformers, ``--save_steps N`` saves every N steps; an explicit --save_strategy still wins."""
    from hf_vitprune.recipe import parse_arguments

    training = parse_arguments(argv)[-1]
    assert training.save_strategy == strategy
    if argv:
        assert training.save_steps == 3


def test_save_steps_from_a_config_file_saves_every_n_steps(tmp_path):
    from hf_vitprune.recipe import parse_arguments

    (tmp_path / "recipe.yaml").write_text("save_steps: 4\n")
    training = parse_arguments(["--config", str(tmp_path / "recipe.yaml")])[-1]
    assert training.save_strategy == "steps" and training.save_steps == 4


# --------------------------------------------------------------------------- one line, not a traceback

MORE_ROWS = [  # checked as ROWS are (test_bad_input): one line, nothing written, the inputs untouched
    ("model-path-missing", lambda f, o: base(f, o, "--model_name_or_path", "/nonexistent/model"), 1,
     ["--model_name_or_path /nonexistent/model", "no such directory", "/nonexistent/model does not exist"],
     "Pass the directory of a saved model"),
    ("model-hub-id-offline", lambda f, o: base(f, o, "--model_name_or_path", "fx/missing"), 1,
     ["fx/missing is neither a local directory nor reachable on the Hub", "HF_HUB_OFFLINE is set"],
     "Pass the directory of a saved model"),
    ("processor-path-missing", lambda f, o: base(f, o, "--image_processor_name", "/nonexistent/processor"), 1,
     ["--image_processor_name /nonexistent/processor", "does not exist"], "--image_processor_name"),
    ("fsdp-one-process", lambda f, o: base(f, o, "--fsdp", "full_shard"), 1,
     ["--fsdp shards the model over several processes", "this run is one process"], "accelerate launch"),
]


@pytest.mark.parametrize("name, build, status, problem, fix", MORE_ROWS, ids=[row[0] for row in MORE_ROWS])
def test_bad_input_named_in_one_line(name, build, status, problem, fix, files, tmp_path, monkeypatch, capsys):
    test_bad_input(name, build, status, problem, fix, files, tmp_path, monkeypatch, capsys)
    assert "Repo id must be" not in capsys.readouterr().err


def _fails_in_one_line(argv, capsys) -> str:
    """Run the command; it must exit 1 with its error as the one last line of stderr and no traceback."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    tail = err[err.rindex("hf-vitprune prune: error: "):]
    assert len(tail.strip().splitlines()) == 1, err
    return tail


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


def test_a_budget_out_of_reach_is_one_line(files, tmp_path, offline, capsys):
    """The method finds the budget unreachable only once it ranks the model: still the one-line error."""
    tail = _fails_in_one_line(base(files, tmp_path / "out", "--target_sparsity", "0.9"), capsys)
    assert "target_sparsity=0.9 is unreachable" in tail and "lower target_sparsity to at most" in tail


def test_resuming_with_another_budget_is_one_line(files, tmp_path, offline, capsys):
    out = tmp_path / "out"
    assert main(base(files, out, "--save_steps", "1")) == 0
    capsys.readouterr()
    tail = _fails_in_one_line(base(files, out, "--save_steps", "1", "--target_sparsity", "0.3"), capsys)
    assert "written with another PruningConfig" in tail and "0.4 in the checkpoint, 0.3 now" in tail
    assert "a new --output_dir" in tail


@pytest.mark.parametrize("family", ["swin", "convnext"])
def test_an_unsupported_family_is_one_line(family, files, tmp_path, offline, capsys):
    from transformers import ConvNextConfig, ConvNextForImageClassification, SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    model = (SwinForImageClassification(SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1],
                                                   num_heads=[1, 1], window_size=2, num_labels=3))
             if family == "swin" else
             ConvNextForImageClassification(ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                           num_labels=3)))
    model.save_pretrained(tmp_path / family)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / family)
    tail = _fails_in_one_line(base(files, tmp_path / "out", "--model_name_or_path", str(tmp_path / family)), capsys)
    assert f"cannot prune {type(model).__name__}" in tail and "Supported models are" in tail


def test_a_yaml_mapping_for_layer_types_is_taken_as_written(tmp_path):
    """YAML gives a mapping where the command line takes JSON text: it is passed on as that JSON."""
    from hf_vitprune.recipe import parse_arguments

    (tmp_path / "recipe.yaml").write_text("method: spvit_conv\nlayer_types: {0: conv3x3, 1: attention}\n")
    config = parse_arguments(["--config", str(tmp_path / "recipe.yaml")])[3]
    assert config.method_options.layer_types == {0: "conv3x3", 1: "attention"}


def test_layer_types_that_are_not_json_are_quoted_as_typed(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("method: spvit_conv\nlayer_types: '{0: conv3x3'\n")
    assert main(["prune", "--config", str(tmp_path / "recipe.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "layer_types='{0: conv3x3' is not JSON" in err


def test_report_of_a_hub_id_offline_is_one_line(monkeypatch, tmp_path, capsys):
    """`report` of a name that is not a local directory, with the Hub switched off: say it is neither."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert main(["report", "fx/missing", "--no-speed"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("hf-vitprune report: error: fx/missing is neither a local directory nor reachable on the "
                          "Hub (HF_HUB_OFFLINE is set")
    assert "Pass a saved model directory" in err
