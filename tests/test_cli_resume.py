"""A kill at any point of ``hf-vitprune prune``, followed by the same command, finishes with the model an
uninterrupted run saves: killed (SIGKILL) inside a checkpoint save, mid-search and mid-fine-tuning, for
gohsp, ofb, spvit_tokens and spvit_conv.

The killed run is a child process (forked from this one, so that it does not pay the imports again)
running tests/scripts/prune_until_killed.py, which holds the run at the kill point until it is killed.
The re-run is the same command, in this process.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_weights
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from hf_vitprune.cli import load_model, main

SCRIPT = Path(__file__).parent / "scripts" / "prune_until_killed.py"
_spec = importlib.util.spec_from_file_location("prune_until_killed", SCRIPT)
driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(driver)

# 8 optimizer steps, a checkpoint every 2 (--save_steps alone saves); the search takes 4 (gohsp prunes in
# one shot by default: 1)
METHOD_FLAGS = {
    "gohsp": [],
    "ofb": [],
    "spvit_tokens": ["--target_flops_reduction", "0.3", "--num_stages", "1"],
    "spvit_conv": ["--search_fraction", "0.5"],
}
SEARCH_FOLDER = {"gohsp": "admm", "ofb": "search", "spvit_tokens": "token_search", "spvit_conv": "conv_search"}
# kill point -> (where the run is held, extra flags for gohsp, the checkpoint the re-run must resume from)
KILLS = {
    # inside the save of the first fine-tuning checkpoint of the 4 + 4 runs: weights saved, pruning state not
    "checkpoint-save": ("save:6", [], "{search}/checkpoint-4"),
    "mid-search": ("step:3", ["--admm_fraction", "0.5"], "{search}/checkpoint-2"),
    "mid-finetuning": ("step:7", [], "finetune/checkpoint-6"),
}
GOHSP_ONE_SHOT_SAVE = "finetune/checkpoint-4"  # one search step, then fine-tuning checkpoints 2, 4, 6, 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 3-class imagefolder of 16x16 images and a tiny random ViT for it; Hub offline, caches in tmp."""
    root = tmp_path_factory.mktemp("cli-resume")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("validation", 2)):
        for name in ("circle", "square", "stripes"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / split / name / f"{i}.png")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=16, patch_size=4, num_labels=3)
    ViTForImageClassification(config).save_pretrained(root / "tiny-vit")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "tiny-vit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(root / "hf_home"))
        patch.setenv("HF_DATASETS_CACHE", str(root / "datasets_cache"))
        yield root


def command(files: Path, output_dir: Path, method: str, extra: list[str]) -> list[str]:
    return ["prune", "--model_name_or_path", str(files / "tiny-vit"), "--train_dir", str(files / "train"),
            "--validation_dir", str(files / "validation"), "--output_dir", str(output_dir), "--method", method,
            "--max_steps", "8", "--per_device_train_batch_size", "4", "--save_steps", "2",
            "--logging_steps", "1", "--use_cpu", "true", "--disable_tqdm", "true", *METHOD_FLAGS[method], *extra]


_references: dict[tuple, Path] = {}


def uninterrupted(files: Path, method: str, extra: list[str]) -> Path:
    """The output directory of the command run straight through (once per method and flags)."""
    key = (method, *extra)
    if key not in _references:
        output_dir = files / "reference" / "-".join(key)
        assert main(command(files, output_dir, method, extra)) == 0
        _references[key] = output_dir
    return _references[key]


def kill_at(point: str, argv: list[str], ready: Path, timeout: float = 300) -> None:
    """Run ``argv`` in a child process held at ``point`` (see the driver script), then SIGKILL it there."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 99
        try:
            status = driver.run(point, str(ready), argv)
        finally:
            os._exit(status)
    ended = None
    try:
        deadline = time.monotonic() + timeout
        while not ready.is_file():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                ended = status
                pytest.fail(f"the run ended (wait status {status}) before reaching {point}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not reach {point} in {timeout} s")
            time.sleep(0.05)
        assert int(ready.read_text()) == pid
    finally:
        if ended is None:
            os.kill(pid, signal.SIGKILL)
            _, ended = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(ended) and os.WTERMSIG(ended) == signal.SIGKILL


@pytest.mark.parametrize("kill", list(KILLS))
@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_a_killed_prune_rerun_saves_the_uninterrupted_model(method, kill, files, tmp_path, caplog):
    point, gohsp_extra, resumed_from = KILLS[kill]
    extra = gohsp_extra if method == "gohsp" else []
    if method == "gohsp" and kill == "checkpoint-save":
        resumed_from = GOHSP_ONE_SHOT_SAVE
    reference = uninterrupted(files, method, extra)
    output_dir = tmp_path / "out"
    argv = command(files, output_dir, method, extra)

    kill_at(point, argv, tmp_path / "ready")
    assert not (output_dir / "model.safetensors").exists()  # killed before the end
    with caplog.at_level(logging.INFO, logger="hf_vitprune.recipe"):
        assert main(argv) == 0  # the same command
    expected = output_dir / resumed_from.format(search=SEARCH_FOLDER[method])
    assert f"resuming training from {expected}" in caplog.text

    assert_same_weights(load_model(str(output_dir)), load_model(str(reference)))


def test_resume_from_checkpoint_true_skips_the_half_written_checkpoint(files, tmp_path, capsys, caplog):
    """``--resume_from_checkpoint true`` picks the checkpoint the API picks; naming the half-written one is a
    one-line error in the command's spelling (a flag, not ``resume_from_checkpoint=True``)."""
    method, (point, _, resumed_from) = "spvit_conv", KILLS["checkpoint-save"]
    output_dir = tmp_path / "out"
    argv = command(files, output_dir, method, [])
    kill_at(point, argv, tmp_path / "ready")
    capsys.readouterr()

    half_written = output_dir / "finetune" / "checkpoint-6"
    assert main([*argv, "--resume_from_checkpoint", str(half_written)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"hf-vitprune prune: error: --resume_from_checkpoint {half_written}: ")
    assert "pruning_state.json" in err and "--resume_from_checkpoint true" in err
    assert "resume_from_checkpoint=True" not in err

    with caplog.at_level(logging.INFO):
        assert main([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert f"Skipping checkpoint {half_written}" in caplog.text
    assert f"resuming the conv_search phase from {output_dir / 'conv_search' / 'checkpoint-4'}" in caplog.text
    assert_same_weights(load_model(str(output_dir)), load_model(str(uninterrupted(files, method, []))))


def test_a_kill_in_the_first_checkpoint_save_reruns_from_the_start(files, tmp_path, caplog):
    """With no complete checkpoint to resume, the output directory holds only the killed run's: start over."""
    method = "spvit_conv"
    output_dir = tmp_path / "out"
    argv = command(files, output_dir, method, [])
    kill_at("save:2", argv, tmp_path / "ready")
    assert [path.name for path in output_dir.iterdir()] == [SEARCH_FOLDER[method]]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert "starting from the beginning" in caplog.text and "resuming" not in caplog.text
    assert_same_weights(load_model(str(output_dir)), load_model(str(uninterrupted(files, method, []))))
