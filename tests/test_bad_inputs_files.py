"""Bad inputs to saving, loading and applying plans, one row each: the error type, a message that names
the problem and the fix, and nothing changed or half-written on disk (no ``.partial`` directory left)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoModelForImageClassification, ViTForImageClassification, ViTModel

from hf_vitprune import PruningConfig, PruningPlan, apply_plan
from hf_vitprune.config import CONFIG_FILE
from hf_vitprune.plan import PLAN_FILE

PLAN = PruningPlan(heads={0: [1, 3], 2: [0]}, neurons={1: list(range(9))})


def _pruned(make_model, name: str = "vit"):
    return apply_plan(make_model(name), PLAN)


def _saved(tmp_path: Path, make_model, name: str = "vit", **save_kwargs) -> Path:
    directory = tmp_path / "model"
    _pruned(make_model, name).save_pretrained(directory, **save_kwargs)
    return directory


def _file(tmp_path: Path, name: str, content: bytes) -> Path:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / name).write_bytes(content)
    return tmp_path / "out"


def _load(loader: Callable[[Path], object], name: str, content: bytes):
    """Setup: a directory holding only ``name`` with ``content``; the call loads it with ``loader``."""

    def setup(tmp_path, make_model, monkeypatch):
        directory = _file(tmp_path, name, content)
        return lambda: loader(directory)

    return setup


def _stock(stock_class: type, arch: str):
    """Setup: a pruned ``arch`` model saved; the call loads it with the stock class."""

    def setup(tmp_path, make_model, monkeypatch):
        directory = _saved(tmp_path, make_model, arch)
        return lambda: stock_class.from_pretrained(directory)

    return setup


def _truncate(path: Path, keep: int | None = None) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 if keep is None else keep])


def _truncated_weights(tmp_path, make_model, shard: int | None = None, keep: int | None = None):
    directory = _saved(tmp_path, make_model, **({"max_shard_size": "16KB"} if shard else {}))
    _truncate(sorted(directory.glob("*.safetensors"))[shard - 1 if shard else 0], keep)
    return lambda: AutoModelForImageClassification.from_pretrained(directory)


def _over_a_file(tmp_path, save: Callable[[Path], object]):
    (tmp_path / "out").write_text("a file, not a directory")
    return lambda: save(tmp_path / "out")


def _failing_save_over_existing(tmp_path, make_model, monkeypatch):
    directory = _saved(tmp_path, make_model)
    new = apply_plan(make_model("vit", seed=1), PruningPlan(heads={1: [2]}))

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(new, "state_dict", full_disk)
    return lambda: new.save_pretrained(directory)


def _apply_twice(tmp_path, make_model, monkeypatch):
    pruned = _pruned(make_model)
    return lambda: apply_plan(pruned, PLAN)


CONFIG_FIX = r"PruningConfig\.save_pretrained"
PLAN_FIX = r"PruningPlan\.save_pretrained"
WEIGHTS_FIX = r"save_pretrained, or download it again .*force_download=True"
LOAD_HINT = r"AutoModelForImageClassification\.from_pretrained.*import hf_vitprune.*trust_remote_code=True"

# id, setup(tmp_path, make_model, monkeypatch) -> the failing call, error type, problem regex, fix regex (or None)
ROWS = [
    ("config_truncated", _load(PruningConfig.from_pretrained, CONFIG_FILE, b'{"method": "ad'),
     ValueError, rf"out/{CONFIG_FILE} is not valid JSON.*corrupt or truncated", CONFIG_FIX),
    ("config_empty", _load(PruningConfig.from_pretrained, CONFIG_FILE, b""),
     ValueError, rf"{CONFIG_FILE} is not valid JSON", CONFIG_FIX),
    ("config_not_utf8", _load(PruningConfig.from_pretrained, CONFIG_FILE, b"\xff\xfe\x00"),
     ValueError, rf"{CONFIG_FILE} is not valid JSON", CONFIG_FIX),
    ("config_array", _load(PruningConfig.from_pretrained, CONFIG_FILE, b"[0.4]"),
     ValueError, rf"{CONFIG_FILE} holds a JSON list, not a JSON object", CONFIG_FIX),
    ("config_unknown_field",
     _load(PruningConfig.from_pretrained, CONFIG_FILE, b'{"target_sparsty": 0.4, "method_options": {}}'),
     ValueError, rf"{CONFIG_FILE}: Unknown PruningConfig fields \['target_sparsty'\]",
     r"valid fields are \[.*'target_sparsity'"),
    ("config_missing", _load(PruningConfig.from_pretrained, PLAN_FILE, b"{}"),
     FileNotFoundError, rf"No {CONFIG_FILE} in .*out", CONFIG_FIX),
    ("plan_truncated", _load(PruningPlan.from_pretrained, PLAN_FILE, b'{"heads": {"0": [1,'),
     ValueError, rf"out/{PLAN_FILE} is not valid JSON.*corrupt or truncated", PLAN_FIX),
    ("plan_string", _load(PruningPlan.from_pretrained, PLAN_FILE, b'"heads"'),
     ValueError, rf"{PLAN_FILE} holds a JSON str, not a JSON object", PLAN_FIX),
    ("plan_bad_index", _load(PruningPlan.from_pretrained, PLAN_FILE, b'{"heads": {"0": [1.5]}}'),
     ValueError, rf"{PLAN_FILE}: PruningPlan\.heads\[0\] has non-integer indices \[1\.5\]", PLAN_FIX),
    ("plan_missing", _load(PruningPlan.from_pretrained, CONFIG_FILE, b"{}"),
     FileNotFoundError, rf"No {PLAN_FILE} at .*out", PLAN_FIX),
    ("weights_truncated", lambda t, m, p: _truncated_weights(t, m),
     OSError, r"model/model\.safetensors: .*truncated or corrupt", WEIGHTS_FIX),
    ("weights_header_cut", lambda t, m, p: _truncated_weights(t, m, keep=5),
     OSError, r"model/model\.safetensors: .*truncated or corrupt", WEIGHTS_FIX),
    ("weight_shard_truncated", lambda t, m, p: _truncated_weights(t, m, shard=3),
     OSError, r"model/model-00003-of-\d+\.safetensors: .*truncated or corrupt", WEIGHTS_FIX),
    ("stock_classifier_class", _stock(ViTForImageClassification, "vit"),
     Exception, r"pruned by hf_vitprune \(model_type 'pruned_vit'\).*stock classes", LOAD_HINT),
    ("stock_backbone_class", _stock(ViTModel, "vit_model"),
     Exception, r"pruned by hf_vitprune \(model_type 'pruned_vit'\)",
     r"AutoModel\.from_pretrained.*import hf_vitprune.*trust_remote_code=True"),
    ("save_model_over_a_file", lambda t, m, p: _over_a_file(t, _pruned(m).save_pretrained),
     NotADirectoryError, r"out: it is a file", r"Pass a directory path"),
    ("save_plan_over_a_file", lambda t, m, p: _over_a_file(t, PLAN.save_pretrained),
     NotADirectoryError, r"out: it is a file", r"Pass a directory path"),
    ("save_config_over_a_file", lambda t, m, p: _over_a_file(t, PruningConfig(target_sparsity=0.4).save_pretrained),
     NotADirectoryError, r"out: it is a file", r"Pass a directory path"),
    ("save_fails_midway", _failing_save_over_existing, OSError, r"No space left on device", None),
    ("plan_dict_unknown_key", lambda t, m, p: lambda: apply_plan(m("vit"), {"heads": {"0": [1]}, "head": {}}),
     ValueError, r"Unknown PruningPlan fields \['head'\]", r"valid fields are .*'heads'"),
    ("plan_wrong_type", lambda t, m, p: lambda: apply_plan(m("vit"), [[0, 1]]),
     TypeError, r"Expected a PruningPlan, got list", r"pass PruningPlan\(heads=.*PruningPlan\.from_dict"),
    ("plan_applied_twice", _apply_twice,
     ValueError, r"heads\[0\] keeps \[3\].*already pruned", r"refer to the original model.*Apply it to the original"),
]


def _disk(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("setup, error, problem, fix", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input(tmp_path, make_model, monkeypatch, setup, error, problem, fix):
    call = setup(tmp_path, make_model, monkeypatch)
    before = _disk(tmp_path)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert not isinstance(info.value, json.JSONDecodeError)
    assert "AmbiguousGlobalPerLayerAttributeError" not in type(info.value).__name__
    assert re.search(problem, message, flags=re.S), message
    if fix is not None:
        assert re.search(fix, message, flags=re.S), message
    assert not list(tmp_path.rglob("*.partial")), "a staging directory was left behind"
    assert _disk(tmp_path) == before, "a failed call changed files on disk"


def test_the_table_is_large_enough():
    assert len(ROWS) >= 15 and len({row[0] for row in ROWS}) == len(ROWS)
