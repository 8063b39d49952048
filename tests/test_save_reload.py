"""Pruned models save as safetensors + config.json (per_layer_config, auto_map) and reload exactly:
through the Auto classes after ``import hf_vitprune``, through ``trust_remote_code`` without it, and
in an image-classification pipeline. Saving is atomic."""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers.modeling_utils
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessor, pipeline

from hf_vitprune import PruningPlan, apply_plan, model_stats

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def auto_class_name(arch: str, helpers) -> str:
    return "AutoModel" if arch in helpers.backbones else "AutoModelForImageClassification"


def empty_plan() -> PruningPlan:
    return PruningPlan(
        heads={0: [3], 1: []}, neurons={1: [2, 9], 2: []}, allow_empty_attention=True, allow_empty_mlp=True
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- in-process round trip


@pytest.mark.parametrize("plan_kind", ["random", "empty_branches"])
def test_save_and_reload_with_auto_classes(model, arch, plan_kind, tmp_path, pixel_values, helpers):
    plan = helpers.random_plan(model, 0) if plan_kind == "random" else empty_plan()
    pruned = apply_plan(model, plan)
    directory = tmp_path / "pruned"
    pruned.save_pretrained(directory)

    files = sorted(p.name for p in directory.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert {"modeling.py", "architectures.py"} <= set(files)  # for trust_remote_code
    assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    assert not [p.name for p in tmp_path.iterdir() if p.name != "pruned"]  # no staging directory left
    config = json.loads((directory / "config.json").read_text())
    auto = auto_class_name(arch, helpers)
    assert config["model_type"] == pruned.config.model_type
    assert config["architectures"] == [type(pruned).__name__]
    assert config["auto_map"]["AutoConfig"] == f"modeling.{type(pruned.config).__name__}"
    assert config["auto_map"][auto] == f"modeling.{type(pruned).__name__}"
    per_layer = config["per_layer_config"]
    recorded = [
        (
            per_layer.get(str(i), {}).get("num_attention_heads", config["num_attention_heads"]),
            per_layer.get(str(i), {}).get("intermediate_size", config.get("intermediate_size")),
        )
        for i in range(3)
    ]
    assert recorded == helpers.widths(pruned)

    reloaded = getattr(transformers, auto).from_pretrained(directory).eval()
    assert type(reloaded) is type(pruned)
    assert_identical(helpers.outputs(reloaded, pixel_values), helpers.outputs(pruned, pixel_values))
    assert model_stats(reloaded) == model_stats(pruned)
    assert_identical(reloaded.state_dict(), pruned.state_dict())


def test_second_plan_round_trips(make_model, tmp_path, pixel_values, helpers):
    model = make_model("beit_shared_bias")
    pruned = apply_plan(model, PruningPlan(heads={0: [0, 1, 3], 1: [2]}, neurons={2: list(range(20))}))
    apply_plan(pruned, PruningPlan(heads={0: [2]}, neurons={2: [0, 19], 0: [36]}))
    assert helpers.widths(pruned) == [(1, 1), (1, 37), (4, 2)]
    pruned.save_pretrained(tmp_path / "twice")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "twice").eval()
    assert_identical(helpers.outputs(reloaded, pixel_values), helpers.outputs(pruned, pixel_values))
    assert model_stats(reloaded) == model_stats(pruned)


# --------------------------------------------------------------------------- without hf_vitprune

REMOTE_CODE_SCRIPT = r"""
import importlib.abc, json, sys


class BlockHfVitprune(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_vitprune":
            raise ImportError("hf_vitprune must not be imported in this process")


sys.meta_path.insert(0, BlockHfVitprune())
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageClassification

torch.set_num_threads(1)
jobs = json.loads(sys.argv[1])
pixel_values = load_file(sys.argv[2])["pixel_values"]
tensors, info = {}, {}
for name, directory, auto in jobs:
    auto_class = AutoModel if auto == "AutoModel" else AutoModelForImageClassification
    model = auto_class.from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        result = model(pixel_values=pixel_values)
    for key, value in result.items():
        if isinstance(value, torch.Tensor):
            tensors[name + "/" + key] = value.contiguous()
    info[name] = {
        "class": type(model).__name__,
        "module": type(model).__module__,
        "params": sum(p.numel() for p in model.parameters()),
    }
assert "hf_vitprune" not in sys.modules, sorted(m for m in sys.modules if "vitprune" in m)
info["vitprune_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "hf_vitprune")
save_file(tensors, sys.argv[3])
with open(sys.argv[4], "w") as handle:
    json.dump(info, handle)
"""


def outputs_without_hf_vitprune(tmp_path, jobs: list[tuple[str, str, str]], pixel_values) -> tuple[dict, dict]:
    """(outputs by ``"<case>/<key>"``, what the process saw per case) of the saved models ``jobs`` (case,
    directory, Auto class name), loaded with ``trust_remote_code=True`` in a process that cannot import
    hf_vitprune, and run on ``pixel_values``."""
    save_file({"pixel_values": pixel_values}, tmp_path / "inputs.safetensors")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, json.dumps(jobs), str(tmp_path / "inputs.safetensors"),
         str(tmp_path / "outputs.safetensors"), str(tmp_path / "info.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["vitprune_modules"] == []
    return load_file(tmp_path / "outputs.safetensors"), info


def test_reload_with_trust_remote_code_without_hf_vitprune(make_model, tmp_path, pixel_values, helpers):
    """One subprocess loads every architecture (plus emptied branches and a twice-pruned model)."""
    cases = {name: (name, helpers.random_plan(make_model(name), 0)) for name in helpers.architectures}
    cases["beit_shared_bias_empty"] = ("beit_shared_bias", empty_plan())
    cases["dinov2_swiglu_empty"] = ("dinov2_swiglu", empty_plan())
    cases["deit_model_empty"] = ("deit_model", empty_plan())
    jobs, expected, params = [], {}, {}
    for case, (arch, plan) in cases.items():
        pruned = apply_plan(make_model(arch, seed=2), plan)
        if case == "vit":  # and a second plan on top of the first
            apply_plan(pruned, PruningPlan(heads={1: [0]}, neurons={0: [0, 1]}))
        directory = tmp_path / "models" / case
        pruned.save_pretrained(directory)
        jobs.append((case, str(directory), auto_class_name(arch, helpers)))
        expected.update({f"{case}/{k}": v for k, v in helpers.outputs(pruned, pixel_values).items()})
        params[case] = (type(pruned).__name__, sum(p.numel() for p in pruned.parameters()))
    got, info = outputs_without_hf_vitprune(tmp_path, jobs, pixel_values)
    assert_identical(got, expected)
    for case, (class_name, count) in params.items():
        assert info[case]["class"] == class_name
        assert info[case]["params"] == count
        assert not info[case]["module"].startswith("hf_vitprune")  # the copied remote code, not the package


# --------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("arch_name", ["vit", "dinov2_swiglu"])
def test_image_classification_pipeline(make_model, arch_name, tmp_path, helpers):
    model = make_model(arch_name)
    pruned = apply_plan(model, helpers.random_plan(model, 1))
    directory = tmp_path / "pipe"
    pruned.save_pretrained(directory)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(directory)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(24, 20, 3), dtype=np.uint8))

    classifier = pipeline("image-classification", model=str(directory))
    predictions = classifier(image)
    processor = AutoImageProcessor.from_pretrained(directory)
    inputs = processor(images=image, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 16, 16)
    with torch.no_grad():
        logits = pruned(**inputs).logits[0]
    top = int(logits.argmax())
    assert predictions[0]["label"] == helpers.labels[top] == pruned.config.id2label[top]
    assert predictions[0]["score"] == pytest.approx(float(logits.softmax(-1)[top]), abs=1e-5)


# --------------------------------------------------------------------------- inconsistent directories


@pytest.mark.parametrize(
    "attribute, layer, stored, edited",
    [("num_attention_heads", 1, 2, 3), ("intermediate_size", 2, 10, 12), ("num_attention_heads", 0, 1, 0)],
)
def test_weights_that_disagree_with_recorded_widths(make_model, tmp_path, attribute, layer, stored, edited):
    model = make_model("vit")
    plan = PruningPlan(heads={0: [2], 1: [0, 3]}, neurons={2: list(range(5, 15))})
    apply_plan(model, plan).save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["per_layer_config"].setdefault(str(layer), {})[attribute] = edited
    config_path.write_text(json.dumps(config))

    with pytest.raises(ValueError, match=rf"encoder layer {layer}\b.*per_layer_config") as info:
        AutoModelForImageClassification.from_pretrained(tmp_path / "m")
    shapes = re.findall(r"\[([\d, ]*)\]", str(info.value))
    assert len(shapes) == 2, str(info.value)
    scale = 8 if attribute == "num_attention_heads" else 1  # head_dim rows per head
    checkpoint_shape, required_shape = ([int(n) for n in s.split(", ") if n] for s in shapes)
    assert stored * scale in checkpoint_shape and edited * scale in required_shape
    assert checkpoint_shape != required_shape


# --------------------------------------------------------------------------- atomic saving


def _pruned_vit(make_model, seed=0):
    model = make_model("vit", seed=seed)
    return apply_plan(model, PruningPlan(heads={0: [1], 2: [0, 3]}, neurons={1: list(range(9))}))


def _fail_on_second_shard(monkeypatch):
    real = transformers.modeling_utils.safe_save_file
    calls = []

    def flaky_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # a shard is already on disk; this one is half-written, then the disk is "full"
            Path(filename).write_bytes(b"\x00" * 100)
            raise OSError("No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", flaky_save)
    return calls


def _fail_in_state_dict(monkeypatch, model):
    def broken_state_dict(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(model, "state_dict", broken_state_dict)
    return None


@pytest.mark.parametrize("failure", ["second_shard", "state_dict"])
def test_failed_save_to_new_directory_leaves_nothing(make_model, tmp_path, monkeypatch, failure):
    pruned = _pruned_vit(make_model)
    if failure == "second_shard":
        calls = _fail_on_second_shard(monkeypatch)
    else:
        calls = _fail_in_state_dict(monkeypatch, pruned)
    with pytest.raises(OSError, match="No space left on device"):
        pruned.save_pretrained(tmp_path / "out", max_shard_size="16KB")
    if calls is not None:
        assert len(calls) == 2  # it failed mid-save, after the first shard was written
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging directory


@pytest.mark.parametrize("failure", ["second_shard", "state_dict"])
def test_failed_save_over_existing_directory_keeps_old_files(make_model, tmp_path, monkeypatch, failure, pixel_values,
                                                            helpers):
    old = _pruned_vit(make_model, seed=0)
    target = tmp_path / "out"
    old.save_pretrained(target)
    (target / "checkpoint-5").mkdir()
    (target / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    before = snapshot(target)

    new = apply_plan(make_model("vit", seed=1), PruningPlan(heads={1: [2]}))
    if failure == "second_shard":
        _fail_on_second_shard(monkeypatch)
    else:
        _fail_in_state_dict(monkeypatch, new)
    with pytest.raises(OSError, match="No space left on device"):
        new.save_pretrained(target, max_shard_size="16KB")
    assert snapshot(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    monkeypatch.undo()
    reloaded = AutoModelForImageClassification.from_pretrained(target).eval()
    assert_identical(helpers.outputs(reloaded, pixel_values), helpers.outputs(old, pixel_values))


def test_save_into_existing_directory_keeps_other_files(make_model, tmp_path, pixel_values, helpers):
    target = tmp_path / "out"
    (target / "checkpoint-5").mkdir(parents=True)
    (target / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    (target / "notes.txt").write_text("keep me")

    first = _pruned_vit(make_model, seed=0)
    first.save_pretrained(target, max_shard_size="16KB")
    shards = sorted(p.name for p in target.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (target / "model.safetensors.index.json").exists()

    second = apply_plan(make_model("vit", seed=1), PruningPlan(heads={1: [2]}, neurons={0: [4]}))
    second.save_pretrained(target)
    assert (target / "checkpoint-5" / "trainer_state.json").read_text() == '{"global_step": 5}'
    assert (target / "notes.txt").read_text() == "keep me"
    # the earlier save's shards and index are gone, so nothing can load stale weights
    assert not list(target.glob("model-*.safetensors")) and not (target / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    reloaded = AutoModelForImageClassification.from_pretrained(target).eval()
    assert_identical(helpers.outputs(reloaded, pixel_values), helpers.outputs(second, pixel_values))
    assert helpers.widths(reloaded) == helpers.widths(second)


def test_saving_leaves_the_in_memory_model_usable(make_model, tmp_path, pixel_values, helpers):
    pruned = _pruned_vit(make_model)
    before = helpers.outputs(pruned, pixel_values)
    pruned.save_pretrained(tmp_path / "a")
    copy.deepcopy(pruned).save_pretrained(tmp_path / "a")  # saving twice over itself is fine
    assert_identical(helpers.outputs(pruned, pixel_values), before)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        ["architectures.py", "config.json", "convolution.py", "fileio.py", "model.safetensors", "modeling.py", "tokens.py"]
    )


# --------------------------------------------------------------------------- mount points and modes


def _fake_mount(monkeypatch, mount: Path) -> None:
    """Make ``mount`` act as a mount point: a rename across its boundary fails with EXDEV, as the kernel's does."""

    def inside(name) -> bool:
        path = Path(os.path.abspath(name))
        return path == mount or mount in path.parents

    def guarded(real):
        def move(src, dst, *args, **kwargs):
            if inside(src) != inside(dst):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
            return real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "rename", guarded(os.rename))
    monkeypatch.setattr(os, "replace", guarded(os.replace))


@pytest.fixture(params=["simulated", "tmpfs"])
def mount_point(request, tmp_path, monkeypatch):
    """An existing, empty directory on another filesystem than its parent: simulated (always) or a real tmpfs
    (root only, where ``mount`` is permitted)."""
    mount = tmp_path / "volume"
    mount.mkdir()
    if request.param == "simulated":
        _fake_mount(monkeypatch, mount)
        yield mount
        return
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _partials(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*.partial")]


def test_save_into_a_mount_point(make_model, mount_point, pixel_values, helpers):
    """A Docker volume or tmpfs as the target: no rename crosses filesystems, nothing is left in the parent."""
    (mount_point / "notes.txt").write_text("keep me")
    first = _pruned_vit(make_model, seed=0)
    first.save_pretrained(mount_point, max_shard_size="16KB")
    second = apply_plan(make_model("vit", seed=1), PruningPlan(heads={1: [2]}))
    second.save_pretrained(mount_point)  # over the first: its shards go
    PruningPlan(heads={1: [2]}).save_pretrained(mount_point)
    first.save_pretrained(mount_point / "sub")  # a new directory inside the mount

    assert _partials(mount_point.parent) == []
    assert [p.name for p in mount_point.parent.iterdir()] == ["volume"]
    assert (mount_point / "notes.txt").read_text() == "keep me"
    assert not list(mount_point.glob("model-*.safetensors"))
    assert PruningPlan.from_pretrained(mount_point) == PruningPlan(heads={1: [2]})
    reloaded = AutoModelForImageClassification.from_pretrained(mount_point).eval()
    assert_identical(helpers.outputs(reloaded, pixel_values), helpers.outputs(second, pixel_values))
    reloaded = AutoModelForImageClassification.from_pretrained(mount_point / "sub").eval()
    assert_identical(helpers.outputs(reloaded, pixel_values), helpers.outputs(first, pixel_values))


def test_failed_save_into_a_mount_point_leaves_it_as_it_was(make_model, mount_point, monkeypatch):
    _pruned_vit(make_model).save_pretrained(mount_point)
    before = snapshot(mount_point)
    new = apply_plan(make_model("vit", seed=1), PruningPlan(heads={1: [2]}))
    _fail_on_second_shard(monkeypatch)
    with pytest.raises(OSError, match="No space left on device"):
        new.save_pretrained(mount_point, max_shard_size="16KB")
    assert snapshot(mount_point) == before
    assert _partials(mount_point.parent) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=oct)
def test_new_directories_get_the_umask_mode(make_model, tmp_path, umask):
    """As stock save_pretrained (os.makedirs): 0o777 less the umask, not mkdtemp's 0700."""
    previous = os.umask(umask)
    try:
        _pruned_vit(make_model).save_pretrained(tmp_path / "model")
        PruningPlan(heads={0: [1]}).save_pretrained(tmp_path / "plan")
        (tmp_path / "stock").mkdir()
    finally:
        os.umask(previous)
    expected = 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "stock").stat().st_mode) == expected
    for name in ("model", "plan"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_saving_over_a_file_names_it(make_model, tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=r"out.*is a file.*directory"):
        _pruned_vit(make_model).save_pretrained(tmp_path / "out")
    assert (tmp_path / "out").read_text() == "not a directory"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --------------------------------------------------------------------------- damaged or misread directories


@pytest.mark.parametrize("shard", [None, 2], ids=["single_file", "second_shard"])
def test_truncated_weights_name_the_file_and_the_fix(make_model, tmp_path, shard):
    directory = tmp_path / "m"
    _pruned_vit(make_model).save_pretrained(directory, **({"max_shard_size": "16KB"} if shard else {}))
    broken = sorted(directory.glob("*.safetensors"))[shard - 1 if shard else 0]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with pytest.raises(OSError) as info:
        AutoModelForImageClassification.from_pretrained(directory)
    message = str(info.value)
    assert str(broken) in message and "truncated" in message
    assert "save_pretrained" in message and "force_download=True" in message
    assert [p.name for p in directory.glob("*.safetensors") if p.name in message] == [broken.name]


@pytest.mark.parametrize("arch_name", ["vit", "vit_model", "deit_teacher", "vit_msn", "beit_shared_bias", "dinov2"])
def test_stock_class_on_a_pruned_directory_says_how_to_load_it(make_model, tmp_path, arch_name, helpers):
    model = make_model(arch_name)
    stock_class = type(model)
    pruned = apply_plan(model, helpers.random_plan(model, 0))
    pruned.save_pretrained(tmp_path / "m")
    with pytest.raises(Exception) as info:
        stock_class.from_pretrained(tmp_path / "m")
    message = str(info.value)
    auto = auto_class_name(arch_name, helpers)
    assert f"{auto}.from_pretrained" in message, message
    assert "import hf_vitprune" in message and "trust_remote_code=True" in message
    assert pruned.config.model_type in message
    # the Auto classes are not affected by what makes the stock one stop
    reloaded = getattr(transformers, auto).from_pretrained(tmp_path / "m")
    assert type(reloaded) is type(pruned)
