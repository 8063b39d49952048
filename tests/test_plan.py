"""PruningPlan: normalisation, JSON round trip, and a clear error for every bad input."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_vitprune import PruningPlan, apply_plan, attach_masks, model_stats
from hf_vitprune.plan import PLAN_FILE

# --------------------------------------------------------------------------- normalisation & round trip


def test_indices_are_sorted_and_layer_keys_become_ints():
    plan = PruningPlan(heads={"2": [3, 0, 1], 0: [2]}, neurons={1: (5, 4)})
    assert plan.heads == {0: [2], 2: [0, 1, 3]}
    assert list(plan.heads) == [0, 2]
    assert plan.neurons == {1: [4, 5]}
    assert plan.kept_heads(2, 4) == [0, 1, 3]
    assert plan.kept_heads(1, 4) == [0, 1, 2, 3]  # a layer not named keeps everything
    assert plan.kept_neurons(0, 3) == [0, 1, 2]


def test_json_string_round_trip_is_exact_and_stable():
    plan = PruningPlan(heads={0: [1], 2: []}, neurons={1: [0, 7]}, allow_empty_attention=True)
    text = plan.to_json_string()
    data = json.loads(text)
    assert data == {
        "heads": {"0": [1], "2": []},
        "neurons": {"1": [0, 7]},
        "allow_empty_attention": True,
        "allow_empty_mlp": False,
    }
    assert list(data) == sorted(data)  # sorted, indented JSON
    assert "\n  " in text
    again = PruningPlan.from_json_string(text)
    assert again == plan
    assert again.to_json_string() == text


def test_save_and_load_directory(tmp_path):
    plan = PruningPlan(heads={1: [0, 3]}, neurons={0: [2]}, allow_empty_mlp=True)
    path = plan.save_pretrained(tmp_path / "new" / "dir")
    assert path == tmp_path / "new" / "dir" / PLAN_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [PLAN_FILE]  # no temporary left behind
    assert PruningPlan.from_pretrained(path.parent) == plan
    assert PruningPlan.from_pretrained(path) == plan  # the file itself works too


def test_load_from_directory_without_plan(tmp_path):
    with pytest.raises(FileNotFoundError, match=PLAN_FILE):
        PruningPlan.from_pretrained(tmp_path)


unit_lists = st.lists(st.integers(0, 500), unique=True, max_size=12)
index_maps = st.dictionaries(st.integers(0, 40), unit_lists, max_size=6)


@settings(max_examples=60, deadline=None)
@given(heads=index_maps, neurons=index_maps)
def test_round_trip_property(heads, neurons):
    plan = PruningPlan(heads=heads, neurons=neurons, allow_empty_attention=True, allow_empty_mlp=True)
    assert plan.heads == {k: sorted(v) for k, v in sorted(heads.items())}
    again = PruningPlan.from_json_string(plan.to_json_string())
    assert again == plan
    assert PruningPlan.from_dict(plan.to_dict()) == plan


# --------------------------------------------------------------------------- bad plans


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(heads={0: [1, 2, 1]}), r"heads\[0\] lists \[1\] more than once"),
        (dict(neurons={2: [5, 5, 6, 6]}), r"neurons\[2\] lists \[5, 6\] more than once"),
        (dict(heads={1: [0, -1]}), r"heads\[1\] has a negative index"),
        (dict(neurons={0: [-3]}), r"neurons\[0\] has a negative index"),
        (dict(heads={-1: [0]}), r"heads has negative layer index -1"),
        (dict(heads={"first": [0]}), r"heads has layer key 'first'; layer keys must be integers"),
        (dict(neurons={1.5: [0]}), r"neurons has layer key 1\.5; layer keys must be integers"),
        (dict(heads={True: [0]}), r"heads has layer key True; layer keys must be integers"),
        (dict(heads={0: [1.5]}), r"heads\[0\] has non-integer indices \[1\.5\]"),
        (dict(neurons={0: ["x"]}), r"neurons\[0\] has non-integer indices \['x'\]"),
        (dict(heads={0: 3}), r"heads\[0\] must be a list of integers"),
        (dict(heads={0: "01"}), r"heads\[0\] must be a list of integers"),
        (dict(heads=[[0, 1]]), r"heads must map layer index -> list of kept indices, got list"),
        (dict(heads={1: []}), r"heads leaves layers \[1\] with nothing kept.*allow_empty_attention=True"),
        (dict(neurons={0: [], 2: []}), r"neurons leaves layers \[0, 2\] with nothing kept.*allow_empty_mlp=True"),
        # each flag allows only its own branch
        (dict(heads={1: []}, allow_empty_mlp=True), r"allow_empty_attention=True"),
        (dict(neurons={1: []}, allow_empty_attention=True), r"allow_empty_mlp=True"),
    ],
)
def test_bad_plan_is_rejected(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        PruningPlan(**kwargs)


def test_empty_branches_allowed_with_their_flags():
    plan = PruningPlan(heads={1: []}, neurons={0: []}, allow_empty_attention=True, allow_empty_mlp=True)
    assert plan.heads == {1: []} and plan.neurons == {0: []}


def test_unknown_fields_are_rejected():
    with pytest.raises(ValueError, match=r"Unknown PruningPlan fields \['head', 'typo'\]"):
        PruningPlan.from_dict({"head": {"0": [1]}, "typo": 1, "neurons": {}})
    text = json.dumps({"heads": {}, "allow_empty": True})
    with pytest.raises(ValueError, match=r"Unknown PruningPlan fields \['allow_empty'\]"):
        PruningPlan.from_json_string(text)


def test_bad_values_in_json_are_rejected():
    with pytest.raises(ValueError, match=r"heads\[0\] lists \[2\] more than once"):
        PruningPlan.from_json_string('{"heads": {"0": [2, 2]}}')
    with pytest.raises(ValueError, match=r"layer key 'x'"):
        PruningPlan.from_json_string('{"neurons": {"x": [2]}}')


# --------------------------------------------------------------------------- plans that do not fit the model


@pytest.mark.parametrize(
    "plan, pattern",
    [
        (PruningPlan(heads={1: [0, 4]}), r"heads\[1\] keeps \[4\], but layer 1 has 4 heads \(valid indices 0\.\.3\)"),
        (
            PruningPlan(neurons={2: [3, 37, 40]}),
            r"neurons\[2\] keeps \[37, 40\], but layer 2 has 37 neurons \(valid indices 0\.\.36\)",
        ),
        (PruningPlan(heads={3: [0]}), r"heads names layer 3, but the model has 3 layers \(0\.\.2\)"),
        (PruningPlan(neurons={7: [0]}), r"neurons names layer 7, but the model has 3 layers \(0\.\.2\)"),
    ],
    ids=["head", "neuron", "head_layer", "neuron_layer"],
)
@pytest.mark.parametrize(
    "call",
    [
        lambda model, plan: plan.validate(model),
        lambda model, plan: apply_plan(model, plan),
        lambda model, plan: attach_masks(model, plan),
        lambda model, plan: model_stats(model, plan),
    ],
    ids=["validate", "apply_plan", "attach_masks", "model_stats"],
)
def test_plan_out_of_range_for_model(make_model, plan, pattern, call):
    model = make_model("vit")
    with pytest.raises(ValueError, match=pattern):
        call(model, plan)
    assert type(model).__name__ == "ViTForImageClassification"
    assert not any(m._forward_pre_hooks for m in model.modules())  # no mask left attached


@pytest.mark.parametrize("arch", ["vit", "dinov2_swiglu"])
def test_two_compactions_equal_their_composed_plan(make_model, pixel_values, arch):
    first = PruningPlan(heads={0: [0, 2, 3]}, neurons={1: list(range(5, 30))},
                        other_units={"head_dims": {0: [1, 2, 4, 5, 7]}}, embedding=list(range(2, 30)))
    later = PruningPlan(heads={0: [0, 2], 1: [1]}, neurons={1: [0, 3, 9]}, other_units={"head_dims": {0: [0, 4]}},
                        embedding=[0, 5, 6, 20])
    stepwise = apply_plan(apply_plan(make_model(arch), first), later)
    composed = first.then(later, make_model(arch))
    assert composed.heads[0] == [0, 3] and composed.heads[1] == [1] and composed.embedding == [2, 7, 8, 22]
    at_once = apply_plan(make_model(arch), composed)
    with torch.no_grad():
        torch.testing.assert_close(stepwise(pixel_values).logits, at_once(pixel_values).logits, rtol=0, atol=0)


def test_valid_plan_validates(make_model):
    model = make_model("beit_shared_bias")
    PruningPlan(heads={0: [0, 3], 2: [1]}, neurons={1: [0, 36]}).validate(model)  # no error


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"heads": {"0": [1, 2', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"heads": {"0": [-1]}}', "negative index"),
    ],
    ids=["truncated", "empty", "not_utf8", "array", "negative_index"],
)
def test_corrupt_plan_file_names_the_file_and_the_fix(tmp_path, content, problem):
    (tmp_path / PLAN_FILE).write_bytes(content)
    with pytest.raises(ValueError) as info:
        PruningPlan.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path / PLAN_FILE) in message and problem in message
    assert "PruningPlan.save_pretrained" in message
    assert not isinstance(info.value, json.JSONDecodeError)
