"""The example script and the README's quickstart, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification, ViTImageProcessor

import hf_vitprune  # noqa: F401  (registers the pruned classes for the reload checks)
from hf_vitprune import PruningPlan, model_stats

from hub_server import FakeHub

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "prune_imagenet.py"
CLASSES = ("circle", "square", "stripes")
TOKEN = "hf_example_secret_token_42"


def _write_imagefolder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
            pixels[..., label] += 150  # a class-dependent colour, so the task is learnable
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    train = _write_imagefolder(root / "train", per_class=8, seed=0)
    validation = _write_imagefolder(root / "validation", per_class=4, seed=1)
    torch.manual_seed(0)
    model_dir = root / "tiny-vit"
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                       image_size=16, patch_size=4, num_labels=len(CLASSES))
    ViTForImageClassification(config).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(model_dir)
    return train, validation, model_dir


def _example_arguments(imagefolder, output_dir: Path) -> list[str]:
    train, validation, model_dir = imagefolder
    return ["--model_name_or_path", str(model_dir), "--train_dir", str(train), "--validation_dir", str(validation),
            "--output_dir", str(output_dir), "--max_steps", "6", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "8", "--calibration_samples", "8", "--admm_update_steps", "2",
            "--target_sparsity", "0.4", "--use_cpu", "true", "--logging_steps", "2", "--disable_tqdm", "true"]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **extra})
    return env


def _assert_saved_model_matches_its_plan(output_dir: Path) -> None:
    plan = PruningPlan.from_pretrained(output_dir)
    model = AutoModelForImageClassification.from_pretrained(output_dir)
    widths = [(layer.heads, layer.neurons) for layer in model_stats(model).layers]
    assert widths == [(len(plan.kept_heads(i, 4)), len(plan.kept_neurons(i, 37))) for i in range(3)]
    assert widths != [(4, 37)] * 3, "the plan must actually prune"
    assert (output_dir / "README.md").is_file() and (output_dir / "pruning_config.json").is_file()


def test_example_on_an_imagefolder_in_one_process(imagefolder, tmp_path):
    output_dir = tmp_path / "out"
    result = subprocess.run([sys.executable, str(EXAMPLE), *_example_arguments(imagefolder, output_dir)],
                            capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "pruned / dense" in result.stdout
    _assert_saved_model_matches_its_plan(output_dir)
    results = json.loads((output_dir / "all_results.json").read_text())
    assert {"train_loss", "eval_accuracy", "dense_accuracy", "train_samples", "eval_samples"} <= set(results)
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 6
    assert (output_dir / "preprocessor_config.json").is_file()
    assert "pin_memory" not in result.stderr


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_cli_resumes_a_killed_run_bit_exactly(imagefolder, tmp_path):
    """SIGKILL during the search phase, resume (explicitly and by detection): the final weights are bit-identical."""
    cli = [sys.executable, "-m", "hf_vitprune.cli", "prune"]
    steps = ["--max_steps", "40", "--save_strategy", "steps", "--save_steps", "10", "--admm_fraction", "0.5"]
    reference = tmp_path / "reference"
    arguments = [*_example_arguments(imagefolder, reference), *steps]
    result = subprocess.run([*cli, *arguments], capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen([*cli, *_example_arguments(imagefolder, killed), *steps], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_env(), cwd=tmp_path)
    first = killed / "admm" / "checkpoint-10"
    deadline = time.monotonic() + 240
    while not ((first / "pruning_state.json").is_file() and (first / "pruning_state.safetensors").is_file()):
        assert process.poll() is None, "the run ended before its first checkpoint was written"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (killed / "model.safetensors").exists(), "the run was killed before it finished"

    # a wrong path fails, says so, and writes nothing
    before = sorted(str(path) for path in killed.rglob("*"))
    wrong = subprocess.run([*cli, *_example_arguments(imagefolder, killed), *steps, "--resume_from_checkpoint",
                            str(tmp_path / "nope")], capture_output=True, text=True, timeout=300, env=_env(),
                           cwd=tmp_path)
    assert wrong.returncode == 1 and "no such directory" in wrong.stderr and str(tmp_path / "nope") in wrong.stderr
    assert sorted(str(path) for path in killed.rglob("*")) == before

    resumed = subprocess.run([*cli, *_example_arguments(imagefolder, killed), *steps], capture_output=True, text=True,
                             timeout=300, env=_env(), cwd=tmp_path)  # no flag: the checkpoint is detected
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Checkpoint detected, resuming training from" in resumed.stderr
    expected, got = _weights(reference), _weights(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


PIPELINE_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from transformers import pipeline
assert "hf_vitprune" not in sys.modules
classifier = pipeline("image-classification", model=sys.argv[1], trust_remote_code=True, device="cpu")
images = [Image.fromarray(np.load(sys.argv[2])[i], mode=sys.argv[3]) for i in range(len(np.load(sys.argv[2])))]
print(json.dumps([result[0]["label"] for result in classifier(images)]))
assert not any(name.startswith("hf_vitprune") for name in sys.modules), "the pipeline must not need hf_vitprune"
"""


def _pipeline_labels(output_dir: Path, images: np.ndarray, mode: str, tmp_path: Path) -> list[str]:
    np.save(tmp_path / "images.npy", images)
    script = tmp_path / "pipe.py"
    script.write_text(PIPELINE_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(output_dir), str(tmp_path / "images.npy"), mode],
                            capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _in_process_labels(output_dir: Path, pixel_values: torch.Tensor) -> list[str]:
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    with torch.no_grad():
        ids = model(pixel_values=pixel_values).logits.argmax(-1).tolist()
    return [model.config.id2label[i] for i in ids]


def test_pipeline_runs_on_the_cli_output_without_hf_vitprune(imagefolder, tmp_path):
    output_dir = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "hf_vitprune.cli", "prune",
                             *_example_arguments(imagefolder, output_dir)],
                            capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    train, _, _ = imagefolder
    paths = sorted(train.rglob("*.png"))[::4]
    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    processor = ViTImageProcessor.from_pretrained(output_dir)
    pixel_values = processor([Image.fromarray(image) for image in images], return_tensors="pt")["pixel_values"]
    assert _pipeline_labels(output_dir, images, "RGB", tmp_path) == _in_process_labels(output_dir, pixel_values)


PROCESSOR_SCRIPT = """
import json, sys
import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification
processor = AutoImageProcessor.from_pretrained(sys.argv[1])
model = AutoModelForImageClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
images = [Image.fromarray(image, mode="L").convert("RGB") for image in np.load(sys.argv[2])]
with torch.no_grad():
    ids = model(**processor(images, return_tensors="pt")).logits.argmax(-1).tolist()
print(json.dumps([model.config.id2label[i] for i in ids]))
assert not any(name.startswith("hf_vitprune") for name in sys.modules), "loading must not need hf_vitprune"
"""


def test_offline_default_saves_a_matching_image_processor(tmp_path):
    """The digits default saves an image processor that maps 8-bit greyscale digits, given as RGB (what
    transformers' pipeline gives), to the training pixels; checked with the remote-code model in a process
    without hf_vitprune."""
    from sklearn.datasets import load_digits

    output_dir = tmp_path / "out"
    arguments = ["--output_dir", str(output_dir), "--dense_cache_dir", str(tmp_path / "dense"), "--dense_epochs", "1",
                 "--max_steps", "4", "--calibration_samples", "16", "--admm_update_steps", "2", "--use_cpu", "true",
                 "--disable_tqdm", "true", "--max_eval_samples", "32"]
    result = subprocess.run([sys.executable, "-m", "hf_vitprune.cli", "prune", *arguments], capture_output=True,
                            text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "pin_memory" not in result.stderr
    images = np.round(load_digits().images[:12] / 16.0 * 255).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "load.py").write_text(PROCESSOR_SCRIPT)
    loaded = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(output_dir), str(tmp_path / "images.npy")],
                            capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    pixel_values = torch.tensor((images / 255.0 - 0.5) / 0.5, dtype=torch.float32)[:, None].expand(-1, 3, -1, -1)
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == _in_process_labels(output_dir, pixel_values)


def test_example_under_torchrun_with_two_processes(imagefolder, tmp_path):
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLE), *_example_arguments(imagefolder, output_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("pruned / dense") == 1, "only the main process prints the table"
    _assert_saved_model_matches_its_plan(output_dir)


def test_example_pushes_the_pruned_model_and_card_without_the_token(imagefolder, tmp_path):
    output_dir = tmp_path / "out"
    arguments = [*_example_arguments(imagefolder, output_dir), "--push_to_hub", "true",
                 "--hub_model_id", "user/tiny-vit-pruned", "--hub_token", TOKEN]
    with FakeHub(lifetime=300) as hub:
        env = _env(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"))
        result = subprocess.run([sys.executable, str(EXAMPLE), *arguments], capture_output=True, text=True,
                                timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, f"{result.stderr[-4000:]}\nunhandled: {hub.unhandled}"
    (commit,) = [c for c in hub.commits if c.repo_id == "user/tiny-vit-pruned"]
    uploaded = set(commit.files) | set(commit.lfs_files)
    assert {"config.json", "model.safetensors", "modeling.py", "architectures.py", "fileio.py", "tokens.py", "convolution.py", "README.md",
            "pruning_config.json", "pruning_plan.json"} <= uploaded
    assert not any(name.startswith(("admm/", "finetune/")) for name in uploaded), "checkpoints stay local"
    card = commit.files["README.md"].decode()
    assert "library_name: hf_vitprune" in card and "pipeline_tag: image-classification" in card
    for content in commit.files.values():
        assert TOKEN.encode() not in content
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"the token leaked into {path}"
    assert TOKEN not in result.stdout and TOKEN not in result.stderr


def _readme_quickstart_command() -> list[str]:
    """The part of the README's first command that runs the job (the install steps are CI's)."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    first = next(line for line in block.splitlines() if line.strip() and not line.startswith("#"))
    run = first.split("&&")[-1].split()
    assert run[:2] == ["python", "examples/prune_imagenet.py"], first
    return [sys.executable, str(REPO / run[1]), *run[2:]]


def test_readme_quickstart_card_reports_the_printed_figures(tmp_path):
    result = subprocess.run(_readme_quickstart_command(), capture_output=True, text=True, timeout=900,
                            env=_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    printed = {}
    for line in result.stdout.splitlines():
        name, _, rest = line.partition("  ")
        cells = re.split(r"\s{2,}", rest.strip())
        if len(cells) == 3 and name in ("accuracy", "Parameters", "FLOPs per image", "Latency, batch 1 (ms)",
                                        "Throughput, batch 64 (images/s)"):
            printed[name] = cells
    assert len(printed) == 5, result.stdout[-3000:]
    output_dir = tmp_path / "outputs" / "vit-digits-gohsp"
    report = json.loads((output_dir / "pruning_report.json").read_text())
    card = (output_dir / "README.md").read_text()
    assert printed["Parameters"][:2] == [f"{report['dense']['params']:,}", f"{report['pruned']['params']:,}"]
    assert printed["accuracy"][:2] == [f"{report['metrics_dense']['accuracy']:.4f}",
                                       f"{report['metrics_pruned']['accuracy']:.4f}"]
    speed = report["speed"]
    assert printed["Latency, batch 1 (ms)"][:2] == [f"{speed['dense']['latency_ms']:.3f}",
                                                   f"{speed['pruned']['latency_ms']:.3f}"]
    assert printed["Throughput, batch 64 (images/s)"][:2] == [f"{speed['dense']['throughput']:.1f}",
                                                             f"{speed['pruned']['throughput']:.1f}"]
    for name, (dense, pruned, _) in printed.items():  # the printout is the card's table
        assert f"| {name} | {dense} | {pruned} |" in card, name
    assert abs(1 - report["pruned"]["params"] / report["dense"]["params"] - 0.4) <= 0.005
