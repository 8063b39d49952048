"""Methods are plug-ins: a method registered from a test file runs end to end, options live with
their method, old flat configs still load, and no module outside hf_vitprune/methods names a method."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForImageClassification, HfArgumentParser, TrainingArguments, ViTConfig
from transformers import ViTForImageClassification

import hf_vitprune
from hf_vitprune import PruningConfig, PruningPlan, PruningTrainer, model_stats, select_plan
from hf_vitprune.architectures import find_encoder_layers
from hf_vitprune.config import config_from_arguments, pruning_arguments
from hf_vitprune.methods import (
    METHODS,
    GOHSPOptions,
    MethodOptions,
    PruningMethod,
    RandomOptions,
    register_method,
    unregister_method,
)
from hf_vitprune.reporting import PruningReport

PACKAGE = Path(hf_vitprune.__file__).parent

# --------------------------------------------------------------------------- a toy method, added here


@dataclass
class KeepFirstOptions(MethodOptions):
    search_fraction: float = field(default=0.5, metadata={"help": "Share of the steps spent searching."})
    penalty: float = field(default=1e-3, metadata={"help": "Weight of the L2 pull on the units to drop."})

    def __post_init__(self):
        super().__post_init__()
        self._check_number("search_fraction", low=0, high=1)


class KeepFirst(PruningMethod):
    """Keeps the lowest-numbered units that fit the budget; pulls the others towards zero meanwhile."""

    name = "keep_first"
    options_class = KeepFirstOptions
    phase_name = "squeeze"
    description = "keep-first: the lowest-numbered units that fit the budget (a test method)"

    def __init__(self, config):
        super().__init__(config)
        self.plan: PruningPlan | None = None
        self.steps_seen = torch.tensor(0)

    def search_steps(self, total_steps):
        return min(max(1, round(total_steps * self.options.search_fraction)), total_steps - 1)

    def _plan(self, model):
        layers = find_encoder_layers(model)
        heads = [-torch.arange(layer.num_heads, dtype=torch.float64) + layer.num_heads for layer in layers]
        neurons = [-torch.arange(layer.num_neurons, dtype=torch.float64) + layer.num_neurons for layer in layers]
        return select_plan(model, heads, neurons, **self.config.selection_arguments())

    def setup(self, context):
        self.plan = self._plan(context.model)

    def loss_terms(self, model, inputs, outputs):
        total = 0.0
        for layer in find_encoder_layers(model):
            dropped = sorted(set(range(layer.num_neurons)) - set(self.plan.kept_neurons(layer.index, layer.num_neurons)))
            total = total + layer.mlp_out.weight[:, dropped].pow(2).sum()
        return {"keep_first_penalty": self.options.penalty * total}

    def on_step_end(self, model, step):
        self.steps_seen = torch.tensor(step)

    def finalize(self, model):
        return self.plan

    def state_dict(self):
        return {"keep_first.steps": self.steps_seen.clone()}

    def load_state_dict(self, state, model):
        self.steps_seen = state["keep_first.steps"].clone()
        self.plan = self._plan(model)

    def log_values(self):
        return {"keep_first_steps": float(self.steps_seen)}

    def card_recipe(self):
        return [f"Keep-first: searched for {self.options.search_fraction:.0%} of the steps."]

    def citations(self):
        return [{"what": "Keep-first (a test, 2026)", "bibtex": "@misc{keepfirst, title = {Keep first}}"}]


@pytest.fixture
def keep_first():
    register_method(KeepFirst)
    yield KeepFirst
    unregister_method(KeepFirst.name)


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                       image_size=16, patch_size=4, num_labels=5)
    return ViTForImageClassification(config)


def random_images(count: int = 48) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict({
        "pixel_values": torch.randn(count, 3, 16, 16, generator=generator).numpy(),
        "labels": torch.randint(0, 5, (count,), generator=generator).numpy(),
    }).with_format("torch")


def test_a_method_registered_in_a_test_runs_end_to_end(tmp_path, keep_first):
    config = PruningConfig(method="keep_first", target_sparsity=0.4, search_fraction=0.5, distillation_weight=0.5)
    args = TrainingArguments(str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3,
                             report_to=[], save_strategy="steps", save_steps=2, disable_tqdm=True, use_cpu=True,
                             logging_steps=1, seed=0)
    data = random_images()
    trainer = PruningTrainer(model=tiny_vit(), args=args, train_dataset=data, eval_dataset=data,
                             pruning_config=config)
    trainer.train()

    # the plan is the method's, and the budget holds in the compacted model
    assert trainer.plan == trainer.method.plan
    assert all(kept == list(range(len(kept))) for kept in trainer.plan.heads.values())
    assert model_stats(trainer.model).params <= 0.6 * trainer.dense_stats.params
    # its hooks ran where they should: the penalty and its logs in the search phase only, per-step work
    search = [log for log in trainer.state.log_history if log.get("phase_squeeze") == 1.0 and "loss" in log]
    finetune = [log for log in trainer.state.log_history if log.get("phase_squeeze") == 0.0 and "loss" in log]
    assert search and finetune
    assert all(log["keep_first_penalty"] > 0 for log in search)
    assert not any("keep_first_penalty" in log for log in finetune)
    assert int(trainer.method.steps_seen) == trainer.method.search_steps(6) == 3
    # its state is in the search-phase checkpoints, under the method's own phase name
    state = json.loads((tmp_path / "run" / "squeeze" / "checkpoint-2" / "pruning_state.json").read_text())
    assert state["phase"] == "squeeze"

    out = tmp_path / "model"
    trainer.save_model(str(out))
    reloaded = AutoModelForImageClassification.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, trainer.model.eval()(pixels).logits, rtol=0, atol=0)
    assert PruningConfig.from_pretrained(out) == config
    report = PruningReport.from_pretrained(out)
    assert report.method_card == trainer.method.card_info()
    card = (out / "README.md").read_text()
    assert "keep-first: the lowest-numbered units" in card
    assert "Keep-first: searched for 50% of the steps." in card
    assert "@misc{keepfirst" in card


def test_a_toy_method_resumes_from_its_own_phase(tmp_path, keep_first):
    config = PruningConfig(method="keep_first", target_sparsity=0.4)
    args = TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=8, report_to=[],
                             save_strategy="steps", save_steps=2, disable_tqdm=True, use_cpu=True, seed=0)
    PruningTrainer(model=tiny_vit(), args=args, train_dataset=random_images(), pruning_config=config).train()
    resumed = PruningTrainer(model=tiny_vit(), args=args, train_dataset=random_images(), pruning_config=config)
    checkpoint = tmp_path / "squeeze" / "checkpoint-2"
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.plan == resumed.method.plan and int(resumed.method.steps_seen) == 3


def test_resuming_with_another_method_is_refused(tmp_path, keep_first):
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=8, report_to=[],
                             save_strategy="steps", save_steps=1, disable_tqdm=True, use_cpu=True, seed=0)
    config = PruningConfig(method="keep_first", target_sparsity=0.4)
    PruningTrainer(model=tiny_vit(), args=args, train_dataset=random_images(), pruning_config=config).train()
    other = PruningTrainer(model=tiny_vit(), args=args, train_dataset=random_images(),
                           pruning_config=PruningConfig(target_sparsity=0.4, calibration_samples=8))
    with pytest.raises(ValueError, match="'squeeze' phase, which method 'gohsp' does not have"):
        other.train(resume_from_checkpoint=str(tmp_path / "squeeze" / "checkpoint-1"))


# --------------------------------------------------------------------------- options live with the method


def test_method_options_are_the_methods_dataclass():
    config = PruningConfig(target_sparsity=0.4, damping=0.9)
    assert isinstance(config.method_options, GOHSPOptions) and config.method_options.damping == 0.9
    assert config == PruningConfig(target_sparsity=0.4, method_options={"damping": 0.9})
    assert config == PruningConfig(target_sparsity=0.4, method_options=GOHSPOptions(damping=0.9))
    assert PruningConfig.from_dict(json.loads(config.to_json_string())) == config
    assert config == PruningConfig(target_sparsity=0.4, method_options='{"damping": 0.9}')  # as a flag gives it


def test_an_option_of_another_method_is_refused_with_its_owner():
    with pytest.raises(ValueError, match=r"no option\(s\) \['damping'\].*damping belongs to gohsp"):
        PruningConfig(method="taylor", target_sparsity=0.4, damping=0.9)
    with pytest.raises(ValueError, match="method_options is a RandomOptions, but method 'gohsp' takes GOHSPOptions"):
        PruningConfig(target_sparsity=0.4, method_options=RandomOptions())
    with pytest.raises(ValueError, match="both as keywords and in method_options"):
        PruningConfig(target_sparsity=0.4, damping=0.9, method_options={"damping": 0.8})


@pytest.mark.parametrize("bad, message", [
    ({"admm_update_steps": 2.5}, "admm_update_steps=2.5 must be an integer >= 1"),
    ({"damping": 1.0}, "damping=1.0 must be a finite number > 0 and < 1"),
    ({"edge_statistic": "weights"}, "edge_statistic='weights' is not a known edge statistic"),
    ({"calibration_samples": 1.5}, "calibration_samples=1.5 must be an integer >= 1"),
    ({"prune_heads": "no"}, "prune_heads='no' must be True or False"),
    ({"target_sparsity": "0.4"}, "target_sparsity='0.4' must be a number .* not a str"),
    ({"admm_update_steps": "20"}, "admm_update_steps='20' must be an integer >= 1"),
])
def test_bad_options_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**{"target_sparsity": 0.4, **bad})


def test_flat_config_files_written_before_the_plug_ins_still_load():
    flat = {  # a pruning_config.json as the previous release wrote it
        "admm_fraction": 0.5, "admm_rho": 0.001, "admm_rho_final": 0.5, "admm_rho_growth": 1.3,
        "admm_update_steps": 20, "calibration_samples": 256, "damping": 0.85, "distillation_temperature": 2.0,
        "distillation_weight": 0.5, "edge_statistic": "output", "importance_alpha": 1.0, "method": "taylor",
        "min_heads_per_layer": 1, "min_neurons_per_layer": 1, "prune_heads": True, "prune_neurons": True,
        "random_seed": 0, "ranking_max_iterations": 1000, "ranking_tolerance": 1e-08, "round_heads_to": 1,
        "round_neurons_to": 1, "target_flops_reduction": None, "target_sparsity": 0.4, "use_distillation_token": True,
    }
    config = PruningConfig.from_dict(flat)
    assert config == PruningConfig(method="taylor", target_sparsity=0.4, admm_rho=0.001, admm_rho_final=0.5,
                                   admm_freeze_fraction=0.25, admm_constant_lr=True, admm_fraction=0.5)
    assert config.method_options.admm_rho == 0.001  # the file's values, not today's defaults
    with pytest.raises(ValueError, match="Unknown PruningConfig fields \\['typo'\\]"):
        PruningConfig.from_dict({**flat, "typo": 1})


def test_every_option_is_a_command_line_flag():
    parser = HfArgumentParser(pruning_arguments())
    flags = {action.dest for action in parser._actions}
    for method in METHODS.values():
        for name in method.options_class.__dataclass_fields__:
            assert name in flags, name
    (arguments,) = parser.parse_args_into_dataclasses(
        ["--method", "random", "--target_flops_reduction", "0.3", "--random_seed", "7", "--admm_rho", "0.01"])
    config = config_from_arguments(arguments)
    assert config == PruningConfig(method="random", target_flops_reduction=0.3, random_seed=7, admm_rho=0.01)
    (arguments,) = parser.parse_args_into_dataclasses(["--method", "taylor", "--target_sparsity", "0.3",
                                                       "--damping", "0.5"])
    with pytest.raises(ValueError, match="--damping is an option of gohsp, not of method 'taylor'"):
        config_from_arguments(arguments)


def test_the_budget_is_derived_once():
    assert PruningConfig(target_sparsity=0.4).budget.metric == "params"
    budget = PruningConfig(target_flops_reduction=0.25).budget
    assert (budget.metric, budget.fraction, budget.target_name) == ("flops", 0.25, "target_flops_reduction")
    stats = model_stats(tiny_vit())
    assert budget.measure(stats) == stats.flops


# --------------------------------------------------------------------------- nothing outside methods/ names one


def _code_names(path: Path) -> tuple[set[str], set[str]]:
    """Identifiers and non-docstring string constants of a module (prose in docstrings and comments is free)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    names, strings = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.update(part for part in (node.name, node.asname) if part)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            strings.add(node.value)
    return names, strings


def _violations(path: Path) -> list[str]:
    names, strings = _code_names(path)
    found = [n for n in names for word in ("gohsp", "admm") if word in n.lower()]
    found += [s for s in strings for word in ("gohsp", "admm") if word in s.lower()]
    if path.parent.name != "importance":  # criteria are named after what they compute, as the baselines are
        found += [s for s in strings if s in METHODS]
    return sorted(set(found))


def test_no_module_outside_methods_names_a_method():
    modules = [p for p in PACKAGE.rglob("*.py") if "methods" not in p.relative_to(PACKAGE).parts]
    assert len(modules) > 15
    offenders = {str(p.relative_to(PACKAGE)): v for p in modules if (v := _violations(p))}
    assert offenders == {}


def test_the_method_name_check_can_fail(tmp_path):
    module = tmp_path / "dispatch.py"
    module.write_text('"""Mentions GOHSP in prose only."""\n\ndef scores(method):\n'
                      '    if method == "taylor":\n        return admm_projection()\n')
    assert _violations(module) == ["admm_projection", "taylor"]
