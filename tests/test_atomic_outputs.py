"""A save is all or nothing, and nothing a run needs is lost to where it writes (issue 24, docs/failures.md).

``PruningTrainer.save_model`` stages every file (weights, configs, image processor, remote code, plan,
report, card) in one directory that moves into place once; a full disk at the last file leaves the
output as it was. A read-only output directory fails before the first training step. Staging left by a
killed save is recognised and removed by the next save or run, and "not empty" says what is there.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import (
    AutoModelForImageClassification,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

from hf_vitprune import PruningConfig, PruningTrainer, recipe

ROOT = Path(__file__).resolve().parents[1]
# What a complete final save holds: from_pretrained's files, remote code, and this project's own.
COMPLETE = {"config.json", "model.safetensors", "preprocessor_config.json", "modeling.py", "fileio.py",
            "training_args.json", "pruning_config.json", "pruning_plan.json", "pruning_report.json", "README.md"}
QUICK_SPEED = dict(repeats=1, warmup=0, batch_size_throughput=4)  # the card's timing, not under test here


def make_trainer(output_dir, **overrides) -> PruningTrainer:
    """A tiny ViT on random images, 4 steps, no checkpoints: the same model and plan every time."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                intermediate_size=37, image_size=16, patch_size=4, num_labels=5))
    generator = torch.Generator().manual_seed(0)
    images = Dataset.from_dict({
        "pixel_values": torch.randn(32, 3, 16, 16, generator=generator).numpy(),
        "labels": torch.randint(0, 5, (32,), generator=generator).numpy(),
    }).with_format("torch")
    values = dict(max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3, report_to=[], save_strategy="no",
                  disable_tqdm=True, seed=0, use_cpu=True)
    values.update(overrides)
    return PruningTrainer(model=model, args=TrainingArguments(str(output_dir), **values), train_dataset=images,
                          processing_class=ViTImageProcessor(size=16),
                          pruning_config=PruningConfig(target_sparsity=0.4, calibration_samples=16))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("run"))
    trainer.train()
    trainer.measure_speed(**QUICK_SPEED)
    return trainer


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every entry under ``directory``, hidden ones included: file bytes, None for a folder."""
    return {p.relative_to(directory).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def partials(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.partial"))


def logits(model, seed: int = 1) -> torch.Tensor:
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(pixel_values=pixels).logits


def fail_writing(monkeypatch, name: str) -> None:
    """A full disk when ``name`` is written (a late file of the save: the weights are already written)."""
    real_text, real_open = Path.write_text, open

    def write_text(self, *args, **kwargs):
        if self.name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_text(self, *args, **kwargs)

    def guarded_open(file, mode="r", *args, **kwargs):
        if os.path.basename(str(file)) == name and any(c in mode for c in "wax"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr("builtins.open", guarded_open)


# --------------------------------------------------------------------------- item 4: one staged save


def test_a_complete_save_loads_with_equal_logits(trained, tmp_path):
    trained.save_model(str(tmp_path / "model"))
    assert COMPLETE <= {p.name for p in (tmp_path / "model").iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging beside it
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(logits(reloaded), logits(trained.model), rtol=0, atol=0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    answers = pipeline("image-classification", model=str(tmp_path / "model"), device="cpu")(image, top_k=5)
    with torch.no_grad():
        expected = trained.model(**ViTImageProcessor(size=16)(image, return_tensors="pt")).logits.softmax(-1)[0]
    got = {answer["label"]: answer["score"] for answer in answers}
    assert got == pytest.approx({trained.model.config.id2label[i]: p.item() for i, p in enumerate(expected)}, abs=1e-6)


@pytest.mark.parametrize("late_file", ["README.md", "pruning_report.json", "pruning_plan.json", "training_args.json"])
def test_full_disk_at_a_late_file_leaves_no_output_directory(trained, tmp_path, monkeypatch, late_file):
    """The weights were written, but without plan, report or card the directory must not appear at all."""
    fail_writing(monkeypatch, late_file)
    with pytest.raises(OSError) as raised:
        trained.save_model(str(tmp_path / "model"))
    assert raised.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # neither the model directory nor a staging directory


def test_full_disk_over_an_earlier_save_keeps_it_byte_for_byte(trained, tmp_path, monkeypatch):
    output = tmp_path / "model"
    trained.save_model(str(output))
    (output / "finetune" / "checkpoint-4").mkdir(parents=True)
    (output / "finetune" / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    before, expected = snapshot(output), logits(trained.model)
    original = {name: value.clone() for name, value in trained.model.state_dict().items()}
    try:
        with torch.no_grad():  # a different model this time: its weights must not reach the directory
            for parameter in trained.model.parameters():
                parameter.add_(1.0)
        fail_writing(monkeypatch, "README.md")
        with pytest.raises(OSError, match="No space left"):
            trained.save_model(str(output))
    finally:
        trained.model.load_state_dict(original)
    monkeypatch.undo()
    assert snapshot(output) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    reloaded = AutoModelForImageClassification.from_pretrained(output)
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=0)


def test_a_commit_cut_short_leaves_nothing_loadable(trained, tmp_path, monkeypatch):
    """Moving the staged files in is many renames; cut short, the directory must not load a mix of two saves."""
    output = tmp_path / "model"
    trained.save_model(str(output))
    (output / "finetune").mkdir()  # a Trainer output directory: the save is moved in entry by entry
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "model.safetensors" and Path(dst).parent == output:
            raise OSError(errno.EIO, "simulated crash during the commit")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        trained.save_model(str(output))
    monkeypatch.undo()
    assert not (output / "config.json").exists()
    with pytest.raises((OSError, ValueError)):
        AutoModelForImageClassification.from_pretrained(output)


def test_checkpoints_are_complete_and_leave_no_staging(tmp_path):
    """Checkpoints go through the same staged save, then Trainer adds its optimizer and state files to them."""
    trainer = make_trainer(tmp_path / "out", save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoints = sorted((tmp_path / "out").glob("*/checkpoint-*"))
    assert {p.parent.name for p in checkpoints} == {"admm", "finetune"}  # the search's and fine-tuning's
    for checkpoint in checkpoints:
        names = {p.name for p in checkpoint.iterdir()}
        assert {"config.json", "model.safetensors", "pruning_state.json", "trainer_state.json", "README.md"} <= names
    assert partials(tmp_path) == []


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """An existing output directory that refuses new entries: chmod 0o555, and where that has no effect (root),
    every ``mkdir`` inside it fails as the kernel's would."""
    directory = tmp_path / "out"
    directory.mkdir()
    directory.chmod(0o555)
    if os.access(directory, os.W_OK):  # root ignores the mode: simulate it
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(os.path.abspath(path)).parent == directory:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    yield directory
    directory.chmod(0o755)


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_read_only_output_dir_fails_before_the_first_training_step(read_only):
    trainer = make_trainer(read_only)
    counter = CountSteps()
    trainer.add_callback(counter)
    with pytest.raises(PermissionError) as raised:
        trainer.train()
    message = str(raised.value)
    assert str(read_only) in message and "chmod" in message and "another output directory" in message
    assert counter.steps == 0 and trainer.state.global_step == 0
    assert trainer.plan is None  # nothing was searched or compacted either


class ReachedLoadData(Exception):
    """The recipe got past its output-directory checks to its first real work."""


def _stop_at_load_data(monkeypatch) -> list:
    """Stand in for the recipe's first real work (loading data): record the call and stop the run there."""
    calls = []

    def load_data(*args, **kwargs):
        calls.append(True)
        raise ReachedLoadData

    monkeypatch.setattr(recipe, "load_data", load_data)
    return calls


def _run_recipe(output_dir, **run_args):
    args = TrainingArguments(str(output_dir), report_to=[], use_cpu=True)
    recipe.run(recipe.ModelArguments(), recipe.DataArguments(), PruningConfig(target_sparsity=0.4), args,
               recipe.RunArguments(**run_args))


@pytest.mark.parametrize("below", ["", "new/deeper"], ids=["existing", "to-be-created"])
def test_recipe_refuses_a_read_only_output_dir_before_any_work(read_only, monkeypatch, below):
    """The output directory itself, or the one a new --output_dir would be created in, is read-only."""
    calls = _stop_at_load_data(monkeypatch)
    with pytest.raises(recipe.RecipeError, match=rf"--output_dir .*{read_only}.*chmod u\+w {read_only}") as raised:
        _run_recipe(read_only / below if below else read_only)
    assert calls == []
    assert ("would be created" in str(raised.value)) == bool(below)


# --------------------------------------------------------------------------- item 5: leftovers of a killed save

KILLED_SAVE = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_atomic_outputs import make_trainer

trainer = make_trainer({run!r})  # untrained: the save is the same staging, and the test stays quick
real = Path.write_text

def stalled(self, *args, **kwargs):
    if self.name == "README.md":  # the last file of the save: weights, plan and configs are in staging
        Path({ready!r}).write_text(str(os.getpid()))
        time.sleep(120)
    return real(self, *args, **kwargs)

Path.write_text = stalled
trainer.save_model({output!r})
"""


def test_a_save_killed_midway_leaves_staging_that_the_next_run_removes(trained, tmp_path, monkeypatch):
    output, ready = tmp_path / "out", tmp_path / "ready"
    output.mkdir()  # a run's output directory, as Trainer creates it before training
    script = KILLED_SAVE.format(tests=str(ROOT / "tests"), run=str(tmp_path / "run"), ready=str(ready),
                                output=str(output))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if process.poll() is not None:
                pytest.fail(f"the save ended before it stalled: {process.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "the save never reached its last file"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    leftovers = [p.name for p in output.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].endswith(".partial")  # the directory looks empty

    calls = _stop_at_load_data(monkeypatch)  # the recipe's next run: not "not empty", and the staging goes
    with pytest.raises(ReachedLoadData):
        _run_recipe(output)
    assert calls == [True] and list(output.iterdir()) == []

    (output / leftovers[0]).mkdir()  # left again; a library user's next save removes it too
    trained.save_model(str(output))
    assert COMPLETE <= {p.name for p in output.iterdir()}
    assert partials(tmp_path) == []
    reloaded = AutoModelForImageClassification.from_pretrained(output)
    torch.testing.assert_close(logits(reloaded), logits(trained.model), rtol=0, atol=0)


def test_overwrite_output_dir_removes_stale_staging(tmp_path, monkeypatch):
    output = tmp_path / "out"
    (output / "finetune" / "checkpoint-2").mkdir(parents=True)  # incomplete: no checkpoint to resume
    (output / ".out.0123456789abcdef.partial" / "model.safetensors").parent.mkdir()
    (output / ".out.0123456789abcdef.partial" / "model.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / ".out.fedcba9876543210.partial").mkdir()  # a killed save into a new directory leaves it beside
    _stop_at_load_data(monkeypatch)
    with pytest.raises(ReachedLoadData):
        _run_recipe(output, overwrite_output_dir=True)
    assert partials(tmp_path) == []


def test_a_live_save_is_not_taken_for_stale(tmp_path):
    """Only staging that no save owns goes: not this process's, nor one another process holds."""
    from hf_vitprune.fileio import atomic_directory, lock_staging, remove_stale_staging

    output = tmp_path / "out"
    with atomic_directory(output) as staging:
        (staging / "config.json").write_text("{}")
        assert remove_stale_staging(output) == []
        assert (staging / "config.json").is_file()
    held = tmp_path / ".out.00000000000000aa.partial"
    held.mkdir()
    descriptor = lock_staging(held)  # as another process's save holds its staging (flock conflicts across descriptors)
    if descriptor is None:
        pytest.skip("this platform or filesystem has no flock; only this process's own saves are known")
    try:
        assert remove_stale_staging(output) == [] and held.is_dir()
    finally:
        os.close(descriptor)
    assert remove_stale_staging(output) == [held] and not held.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_not_empty_says_what_is_there(tmp_path):
    output = tmp_path / "out"
    (output / "runs").mkdir(parents=True)
    (output / "notes.txt").write_text("mine")
    args = TrainingArguments(str(output), report_to=[], use_cpu=True)
    with pytest.raises(recipe.RecipeError, match=r"not empty \(it holds notes\.txt, runs/") as raised:
        recipe.resolve_checkpoint(args, recipe.RunArguments(), "gohsp")
    assert "--overwrite_output_dir" in str(raised.value)
