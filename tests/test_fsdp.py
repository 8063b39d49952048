"""Pruning under accelerate's FSDP plugin (FSDP2, sharded parameters): 2 processes against 1.

tests/scripts/fsdp_prune.py runs GOHSP (ADMM on DTensor-sharded weights) under FSDP with 2 processes
(torchrun; gloo on CPU, where accelerate's FSDP2 path is forced because accelerate enables FSDP only
on accelerators) and without FSDP in 1 process on the same 16 images per step. The properties:
every rank derives the plan the single process derives, the compacted, fine-tuned model equals the
single process's, and a run killed mid-search or mid-fine-tuning resumes from its sharded
checkpoint to the same model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

import hf_vitprune  # noqa: F401  (registers the pruned classes for the reload)
from hf_vitprune import PruningPlan, model_stats

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_prune.py"


def _run(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    _run([sys.executable, str(SCRIPT), str(out / "single"), "single"])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
          str(out / "fsdp"), "fsdp"])
    return out


def _plan(directory: Path, rank: int = 0) -> PruningPlan:
    return PruningPlan.from_json_string((directory / f"rank{rank}_plan.json").read_text())


def _assert_same_model(got: Path, expected: Path) -> None:
    got, expected = load_file(got / "model.safetensors"), load_file(expected / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:  # the same steps on the same images; only the reduction order differs
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_every_rank_derives_the_single_process_plan(runs):
    single = _plan(runs / "single" / "reference")
    for run in ("reference", "resumed_search", "resumed_finetune"):
        assert _plan(runs / "fsdp" / run, 0) == _plan(runs / "fsdp" / run, 1) == single, run
    assert any(len(single.kept_heads(i, 4)) < 4 for i in range(3)), "the plan must prune heads"


def test_the_compacted_model_equals_the_single_process_one(runs):
    fsdp_model, single_model = runs / "fsdp" / "reference" / "model", runs / "single" / "reference" / "model"
    _assert_same_model(fsdp_model, single_model)
    losses = json.loads((runs / "fsdp" / "reference" / "losses.json").read_text())
    expected = json.loads((runs / "single" / "reference" / "losses.json").read_text())
    assert losses == pytest.approx(expected, rel=1e-5)  # the dense model, and the pruned one, evaluate alike
    assert losses["train_end"] == losses["after"]
    reloaded = AutoModelForImageClassification.from_pretrained(fsdp_model)  # a plain pruned model, not shards
    plan = _plan(runs / "fsdp" / "reference")
    widths = [(layer.heads, layer.neurons) for layer in model_stats(reloaded).layers]
    assert widths == [(len(plan.kept_heads(i, 4)), len(plan.kept_neurons(i, 36))) for i in range(3)]


@pytest.mark.parametrize(("run", "checkpoint", "first_steps"), [
    ("resumed_search", "admm/checkpoint-2", {"admm": 2, "finetune": 4}),  # killed after step 3
    ("resumed_finetune", "finetune/checkpoint-6", {"finetune": 6}),  # killed after step 7, fine-tuning's 3rd
])
def test_a_killed_run_resumes_from_its_sharded_checkpoint(runs, run, checkpoint, first_steps):
    directory = runs / "fsdp" / run
    assert (directory / checkpoint / "pytorch_model_fsdp_0").is_dir()  # FSDP's own sharded weights
    assert json.loads((directory / "first_steps.json").read_text()) == first_steps  # it resumed, not restarted
    _assert_same_model(directory / "model", runs / "fsdp" / "reference" / "model")


# --------------------------------------------------------------------------- what is refused, before any work


def _trainer(tmp_path, method: str = "gohsp"):
    from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

    from hf_vitprune import PruningConfig, PruningTrainer

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=36,
                       image_size=16, patch_size=4, num_labels=5)
    budget = {"target_sparsity": 0.4} if method != "spvit_tokens" else {"target_flops_reduction": 0.3}
    return PruningTrainer(model=ViTForImageClassification(config),
                          args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                          pruning_config=PruningConfig(method=method, **budget))


@pytest.fixture
def fsdp_on(monkeypatch):
    """Makes a trainer look as if accelerate had prepared FSDP with the given plugin settings."""
    from types import SimpleNamespace

    def enable(trainer, **plugin):
        monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
        monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", SimpleNamespace(**plugin), raising=False)
        return trainer

    return enable


def test_fsdp_version_1_is_refused(tmp_path, fsdp_on):
    trainer = fsdp_on(_trainer(tmp_path), fsdp_version=1)
    with pytest.raises(ValueError, match="FSDP version 2 .* only: set fsdp_version: 2"):
        trainer._check_sharding()
    fsdp_on(trainer, fsdp_version=2)._check_sharding()  # the ADMM methods shard


@pytest.mark.parametrize("method", ["ofb", "spvit_tokens", "spvit_conv"])
def test_a_method_not_built_for_sharded_parameters_is_refused(tmp_path, fsdp_on, method):
    trainer = fsdp_on(_trainer(tmp_path, method), fsdp_version=2)
    with pytest.raises(ValueError, match=rf"Method '{method}' cannot run under FSDP.* gohsp, magnitude, random, "
                                         rf"taylor"):
        trainer._check_sharding()


def test_deepspeed_zero_3_is_refused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    trainer = _trainer(tmp_path)
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    zero_3 = property(lambda state: SimpleNamespace(zero_stage=3))
    monkeypatch.setattr(type(trainer.accelerator.state), "deepspeed_plugin", zero_3)
    with pytest.raises(ValueError, match="cannot prune under DeepSpeed ZeRO stage 3"):
        trainer._check_sharding()
