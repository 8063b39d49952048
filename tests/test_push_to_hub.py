"""Uploading a pruned model through the real huggingface_hub client to a local fake Hub (tests/hub_server.py).

The uploads run in a subprocess with ``HF_ENDPOINT`` pointing at the fake Hub (as a user would set
it), offline mode off and an empty ``HF_HOME`` (no stored token): one run pushes a saved model
directory with ``hf_vitprune.reporting.push_model_directory`` and then the in-memory model with
transformers' ``model.push_to_hub``. The tests decode the recorded commits.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from hf_vitprune import PruningConfig, PruningPlan, apply_plan
from hf_vitprune.reporting import PruningReport, eval_results, push_model_directory, write_model_card

from hub_server import FakeHub

TOKEN = "hf_fake_secret_token"
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, image_size=16,
            patch_size=4, num_labels=5)
PLAN = PruningPlan(heads={0: [0, 2]}, neurons={1: [0, 1, 2]})
MODEL_FILES = {"model.safetensors", "config.json", "modeling.py", "architectures.py", "fileio.py", "tokens.py",
               "convolution.py"}
PRUNING_FILES = {"pruning_config.json", "pruning_plan.json", "pruning_report.json", "README.md"}

PUSH = r"""
import sys
import hf_vitprune
from hf_vitprune.reporting import push_model_directory
from transformers import AutoModelForImageClassification

directory, token = sys.argv[1], sys.argv[2]
print("directory:", push_model_directory(directory, "user/tiny-pruned", token=token).oid)
model = AutoModelForImageClassification.from_pretrained(directory)
print("mixin:", model.push_to_hub("user/tiny-mixin", token=token).oid)
"""


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hub") / "tiny-pruned"
    torch.manual_seed(0)
    dense = ViTForImageClassification(ViTConfig(**TINY))
    model = apply_plan(copy.deepcopy(dense), PLAN)
    model.save_pretrained(directory)
    config = PruningConfig(target_sparsity=0.4)
    config.save_pretrained(directory)
    PLAN.save_pretrained(directory)
    report = PruningReport.from_models(dense, model, pruning_config=config, plan=PLAN, dataset="beans",
                                       dataset_split="validation", metrics_pruned={"accuracy": 0.625},
                                       repo_id="user/tiny-pruned")
    write_model_card(directory, report)
    # what a Trainer output directory also holds, and must stay local
    (directory / "training_args.json").write_text('{"hub_token": "<HUB_TOKEN>"}')
    (directory / "checkpoint-2").mkdir()
    (directory / "checkpoint-2" / "config.json").write_text("{}")

    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    with FakeHub(lifetime=180) as hub:
        env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path_factory.mktemp("hf_home")),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="info")
        result = subprocess.run([sys.executable, "-c", PUSH, str(directory), TOKEN], env=env, capture_output=True,
                                text=True, timeout=240, cwd=directory.parent)
    assert result.returncode == 0, f"push failed:\n{result.stdout}\n{result.stderr}\nunhandled: {hub.unhandled}"
    commits = {commit.repo_id: commit for commit in hub.commits}
    assert set(commits) == {"user/tiny-pruned", "user/tiny-mixin"}, hub.unhandled
    return types.SimpleNamespace(directory=directory, model=model, report=report, hub=hub, result=result,
                                 directory_commit=commits["user/tiny-pruned"], mixin_commit=commits["user/tiny-mixin"])


def test_directory_upload_commits_exactly_the_model_files(pushed):
    commit = pushed.directory_commit
    assert set(commit.files) == MODEL_FILES | PRUNING_FILES  # no training_args.json, no checkpoint-*/
    assert not commit.lfs_files and not commit.deleted
    for name, content in commit.files.items():
        assert content == (pushed.directory / name).read_bytes(), name
    assert commit.revision == "main" and commit.header["summary"]
    created = [repo for repo in pushed.hub.repos if repo["name"] == "tiny-pruned"]
    assert created and created[0]["organization"] == "user" and created[0].get("type", "model") == "model"


def test_uploaded_card_metadata(pushed):
    readme = pushed.directory_commit.files["README.md"].decode()
    assert readme in pushed.hub.validated  # the card went through validate-yaml before the commit
    data = ModelCard(readme).data.to_dict()
    assert data["library_name"] == "hf_vitprune"
    assert data["pipeline_tag"] == "image-classification"
    assert data["tags"] == ["pruned", "vision-transformer", "hf_vitprune", "gohsp"]
    assert data["datasets"] == ["beans"]
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == pushed.report.display_name and results == eval_results(pushed.report)
    assert [(r.metric_type, r.metric_value, r.dataset_split) for r in results] == [("accuracy", 0.625, "validation")]
    assert 'from_pretrained("user/tiny-pruned")' in readme
    uploaded_config = json.loads(pushed.directory_commit.files["pruning_config.json"])
    assert PruningConfig.from_dict(uploaded_config) == PruningConfig(target_sparsity=0.4)


def test_uploaded_model_loads_with_identical_logits(pushed, tmp_path):
    for name, content in pushed.directory_commit.files.items():
        (tmp_path / name).write_bytes(content)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=images).logits, pushed.model.eval()(pixel_values=images).logits)


def test_token_never_leaves_the_authorization_header(pushed):
    needle = TOKEN.encode()
    for commit in (pushed.directory_commit, pushed.mixin_commit):
        for name, content in commit.files.items():
            assert needle not in content, f"the token was uploaded in {commit.repo_id}/{name}"
        assert TOKEN not in json.dumps(commit.header)
    for content in pushed.hub.validated:
        assert TOKEN not in content
    assert TOKEN not in pushed.result.stdout and TOKEN not in pushed.result.stderr
    for path in pushed.directory.rglob("*"):
        assert not path.is_file() or needle not in path.read_bytes(), path
    commits = [r for r in pushed.hub.requests if "/commit/" in r.path]
    assert len(commits) == 2  # the token was used, as a bearer header, and only there
    for request in pushed.hub.requests:
        headers = {key.lower(): value for key, value in request.headers.items()}
        if request in commits:
            assert headers["authorization"] == f"Bearer {TOKEN}"
        headers.pop("authorization", None)
        assert TOKEN not in json.dumps(headers) and TOKEN not in request.path


def test_transformers_push_to_hub_uploads_the_pruned_model(pushed):
    """``model.push_to_hub`` (transformers' PushToHubMixin) works against the same endpoints.

    It uploads the weights, config and remote-code files; its README is transformers' generic card and
    it does not upload pruning_config.json (those come from PruningTrainer.push_to_hub / push_model_directory).
    """
    commit = pushed.mixin_commit
    assert MODEL_FILES <= set(commit.files)
    assert commit.files["model.safetensors"] == (pushed.directory / "model.safetensors").read_bytes()
    config = json.loads(commit.files["config.json"])
    assert config["model_type"] == "pruned_vit" and config["auto_map"]["AutoModelForImageClassification"]


def test_refuses_to_upload_a_file_holding_the_token(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text(f"---\nlicense: mit\n---\nmy token is {TOKEN}\n")
    with pytest.raises(ValueError, match="README.md") as error:
        push_model_directory(tmp_path, "user/leaky", token=TOKEN)  # fails before any request
    assert TOKEN not in str(error.value)
