"""ONNX export of every kind of pruned model: ONNX Runtime's outputs equal PyTorch's at batch 1 and 7; bad input."""

from __future__ import annotations

import onnxruntime
import pytest
import torch

from hf_vitprune import PruningPlan, add_token_pruning, apply_plan, convert_attention
from hf_vitprune.cli import main as cli_main
from hf_vitprune.export import export_onnx


def pruned_models(make_model, helpers) -> dict:
    widths = make_model("deit_teacher")
    apply_plan(widths, helpers.random_plan(widths, 1))
    embedding = make_model("vit")  # OFB's kind of model: a narrowed embedding and uneven head dims
    apply_plan(embedding, PruningPlan(heads={0: [0, 2]}, neurons={1: list(range(20))}, embedding=list(range(0, 32, 2)),
                                      other_units={"head_dims": {2: [0, 1, 5]}}))
    backbone = make_model("vit_model")
    apply_plan(backbone, helpers.random_plan(backbone, 2))
    return {
        "heterogeneous_widths": widths,
        "narrowed_embedding": embedding,
        "token_pruned": add_token_pruning(make_model("vit"), [0.5, 0.25]),
        "conv_hybrid": convert_attention(make_model("dinov2"), {0: "conv3x3", 2: "conv1x1"}),
        "backbone": backbone,
    }


@pytest.mark.parametrize("kind", ["heterogeneous_widths", "narrowed_embedding", "token_pruned", "conv_hybrid",
                                  "backbone"])
def test_onnx_runtime_equals_pytorch_at_batch_1_and_7(make_model, helpers, tmp_path, kind):
    model = pruned_models(make_model, helpers)[kind].eval()
    model.save_pretrained(tmp_path / "model")
    result = export_onnx(tmp_path / "model", tmp_path / "model.onnx")
    assert result.path.is_file() and set(result.max_abs_diff) == {1, 7}
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for batch_size in (1, 7):  # an independent check, on other images
        images = torch.randn(batch_size, 3, 16, 16, generator=torch.Generator().manual_seed(100 + batch_size))
        with torch.no_grad():
            outputs = model(pixel_values=images)
        expected = outputs.logits if hasattr(outputs, "logits") else outputs.last_hidden_state
        got = torch.from_numpy(session.run(None, {"pixel_values": images.numpy()})[0])
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.onnx"]  # no partial file left


def test_the_command_line_export(make_model, helpers, tmp_path, capsys):
    model = pruned_models(make_model, helpers)["conv_hybrid"]
    model.save_pretrained(tmp_path)
    assert cli_main(["export", str(tmp_path), "--format", "onnx"]) == 0
    assert (tmp_path / "model.onnx").is_file()
    out = capsys.readouterr().out
    assert f"Wrote {tmp_path / 'model.onnx'} (opset 18, dynamic batch)" in out and "batch 7:" in out


def test_bad_exports_name_the_problem_and_write_nothing(make_model, tmp_path, capsys):
    make_model("vit").save_pretrained(tmp_path / "dense")
    assert cli_main(["export", str(tmp_path / "dense")]) == 1
    assert "holds a 'vit' model, not one pruned by hf_vitprune" in capsys.readouterr().err
    assert not (tmp_path / "dense" / "model.onnx").exists()
    (tmp_path / "empty").mkdir()
    assert cli_main(["export", str(tmp_path / "empty")]) == 1
    assert "has no config.json" in capsys.readouterr().err
    pruned = apply_plan(make_model("vit"), PruningPlan(heads={0: [1]}))
    pruned.save_pretrained(tmp_path / "pruned")
    assert cli_main(["export", str(tmp_path / "pruned"), "--opset", "13"]) == 1
    assert "opset=13 is not supported" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "pruned").iterdir() if "onnx" in p.name) == []
    with pytest.raises(ValueError, match="opset=17 is not supported"):
        export_onnx(pruned, tmp_path / "x.onnx", opset=17)


def test_report_times_the_model_against_its_dense_architecture_in_onnx_runtime(make_model, helpers, tmp_path, capsys):
    model = pruned_models(make_model, helpers)["token_pruned"]
    model.save_pretrained(tmp_path)
    assert cli_main(["report", str(tmp_path), "--no-speed", "--onnx", "--repeats", "3", "--warmup", "1",
                     "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "ONNX Runtime speed: onnxruntime" in out and "median of 3 runs after 1 warm-up runs" in out
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines()
            if line.startswith(("Latency, batch 1", "Throughput, batch 8"))}
    latency, throughput = rows["Latency, batch 1 (ms)"], rows["Throughput, batch 8 (images/s)"]
    dense, pruned = float(latency[-5]), float(latency[-4])
    assert dense > 0 and pruned > 0 and float(latency[-3][:-1]) == pytest.approx(pruned / dense, abs=0.01)
    dense, pruned = float(throughput[-3]), float(throughput[-2])
    assert dense > 0 and pruned > 0 and float(throughput[-1][:-1]) == pytest.approx(pruned / dense, abs=0.01)
