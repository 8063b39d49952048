"""Issue 24, export: an export never writes over the model it reads nor over any file unasked, a killed export's
staging file is removed by the next one, bad requests are one line naming the fix, and a pruned BEiT with a
relative position bias exports."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnxruntime
import pytest
import torch
from transformers import AutoModelForImageClassification

import hf_vitprune.export
from hf_vitprune import PruningPlan, apply_plan
from hf_vitprune.cli import main
from hf_vitprune.export import export_onnx, max_opset

ROOT = Path(__file__).resolve().parents[1]
IMAGES = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def saved(make_model, tmp_path):
    """A tiny pruned ViT saved in tmp_path/model."""
    directory = tmp_path / "model"
    apply_plan(make_model("vit"), PruningPlan(heads={0: [1]}, neurons={1: list(range(9))})).save_pretrained(directory)
    return directory


def snapshot(directory: Path) -> dict[str, str]:
    """Every file of ``directory`` (recursively) and a hash of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def logits(directory: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForImageClassification.from_pretrained(directory).eval()(pixel_values=IMAGES).logits


def one_error_line(err: str) -> str:
    """The CLI's single ``error:`` line (torch may log warnings around it, but no traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hf-vitprune export: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def no_export(monkeypatch) -> list:
    """Make torch.onnx.export record its calls and fail: a refusal must come before any exporting."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.onnx.export was called")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    return calls


def run_python(code: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


# --------------------------------------------------------------------------- item 1: never over the model, nor unasked


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_is_a_file_of_the_model_is_refused_even_with_overwrite(saved, capsys, monkeypatch, name,
                                                                               overwrite):
    before, expected = snapshot(saved), logits(saved)
    calls = no_export(monkeypatch)
    assert main(["export", str(saved), "--output", str(saved / name), *(["--overwrite"] if overwrite else [])]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"--output {saved / name} is {name} of the model being exported ({saved})" in line
    assert "refused even with --overwrite" in line and f"e.g. {saved / 'model.onnx'}" in line
    assert calls == [] and snapshot(saved) == before
    torch.testing.assert_close(logits(saved), expected, rtol=0, atol=0)


def test_a_loaded_model_s_own_files_are_refused_through_the_api(saved):
    """A model passed as a module still remembers its directory (from_pretrained records it)."""
    before = snapshot(saved)
    model = AutoModelForImageClassification.from_pretrained(saved)
    with pytest.raises(FileExistsError, match="is model.safetensors of the model being exported"):
        export_onnx(model, saved / "model.safetensors", overwrite=True)
    assert snapshot(saved) == before


def test_an_existing_output_is_kept_unless_overwrite_is_passed(saved, tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"somebody's graph")
    calls = no_export(monkeypatch)
    assert main(["export", str(saved), "--output", str(mine)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.endswith(f"error: {mine} already exists; pass --overwrite (overwrite=True) to replace it, or "
                         f"choose another --output.")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_onnx(saved, mine)
    assert calls == [] and mine.read_bytes() == b"somebody's graph"


def test_overwrite_replaces_an_existing_output_at_the_newest_opset(saved, tmp_path, capsys):
    """--overwrite does replace; and the newest opset the validation allows does export."""
    output = tmp_path / "graph.onnx"
    output.write_bytes(b"an older export")
    assert main(["export", str(saved), "--output", str(output), "--overwrite", "--opset", str(max_opset())]) == 0
    assert f"Wrote {output} (opset {max_opset()}, dynamic batch)" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"pixel_values": IMAGES.numpy()})[0])
    torch.testing.assert_close(got, logits(saved), rtol=0, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.onnx", "model"]


# --------------------------------------------------------------------------- item 2: a killed export


def test_a_killed_export_s_staging_file_is_removed_by_the_next_export(saved, tmp_path, capsys):
    """SIGKILL while the graph is being verified leaves the staging file; a live export's file is left alone; the
    next export removes the stale one, says so, and writes a complete graph."""
    output, ready = tmp_path / "out" / "model.onnx", tmp_path / "ready"
    process = run_python(f"""
        import time, onnxruntime
        from hf_vitprune.export import export_onnx

        def verify(*args, **kwargs):  # the graph is written; the export is verifying it
            open({str(ready)!r}, "w").close()
            time.sleep(600)

        onnxruntime.InferenceSession = verify
        export_onnx({str(saved)!r}, {str(output)!r})
    """)
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the export never reached its verification"
            time.sleep(0.1)
        (staging,) = [p for p in output.parent.iterdir() if p.name.startswith(".model.onnx")]
        assert staging.name.endswith(".partial") and staging.stat().st_size > 0 and not output.exists()
        assert hf_vitprune.export._remove_stale_staging(output) == () and staging.exists()  # alive: not stale
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    assert process.returncode == -signal.SIGKILL and staging.exists()

    assert main(["export", str(saved), "--output", str(output)]) == 0
    assert f"Removed {staging}, left by an export to {output} that was interrupted." in capsys.readouterr().out
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.onnx"]
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"pixel_values": IMAGES.numpy()})[0])
    torch.testing.assert_close(got, logits(saved), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- item 3: one line, not a traceback


def test_an_opset_beyond_the_installed_exporter_is_one_line_before_exporting(saved, capsys, monkeypatch):
    before, calls = snapshot(saved), no_export(monkeypatch)
    highest = max_opset()
    assert main(["export", str(saved), "--opset", str(highest + 1)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"opset={highest + 1} is not supported" in line and f"writes opsets 18 to {highest}" in line
    assert f"pass --opset between 18 and {highest}" in line
    assert calls == [] and snapshot(saved) == before


def test_an_output_that_is_a_directory_is_one_line(saved, tmp_path, capsys, monkeypatch):
    (tmp_path / "exports").mkdir()
    calls = no_export(monkeypatch)
    assert main(["export", str(saved), "--output", str(tmp_path / "exports")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.endswith(f"--output {tmp_path / 'exports'} is a directory; name the file to write, e.g. "
                         f"--output {tmp_path / 'exports' / 'model.onnx'}.")
    assert calls == [] and list((tmp_path / "exports").iterdir()) == []


def test_a_read_only_output_directory_is_refused_before_exporting(saved, tmp_path, capsys, monkeypatch):
    """Root ignores permission bits, so the read-only file system is the one the staging file's creation meets."""
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".partial"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    calls = no_export(monkeypatch)
    monkeypatch.setattr(os, "open", read_only)
    assert main(["export", str(saved), "--output", str(tmp_path / "ro" / "model.onnx")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {tmp_path / 'ro' / 'model.onnx'}: Read-only file system (nothing was exported)" in line
    assert "choose another --output" in line
    assert calls == [] and list((tmp_path / "ro").iterdir()) == []


def test_a_full_disk_at_write_time_is_one_line_and_leaves_nothing(saved, tmp_path):
    """A real write failure: a file-size limit (EFBIG, as ENOSPC on a full disk) hits the graph's write."""
    output = tmp_path / "out" / "model.onnx"
    process = run_python(f"""
        import resource, signal, sys
        import torch, onnxruntime, onnxscript, hf_vitprune.export
        from hf_vitprune.cli import main
        torch.set_num_threads(1)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        sys.exit(main(["export", {str(saved)!r}, "--output", {str(output)!r}]))
    """)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    line = one_error_line(err)
    assert f"cannot write {output}: File too large (nothing was written there)" in line
    assert list(output.parent.iterdir()) == []


@pytest.mark.parametrize("atol", [-1, float("nan"), "0.1", True])
def test_a_bad_atol_is_a_value_error_naming_the_argument(saved, tmp_path, monkeypatch, atol):
    calls = no_export(monkeypatch)
    with pytest.raises(ValueError, match=rf"^atol={atol!r} is not a tolerance: pass a number >= 0"):
        export_onnx(saved, tmp_path / "x.onnx", atol=atol)
    assert calls == [] and not (tmp_path / "x.onnx").exists()


# --------------------------------------------------------------------------- item 4: BEiT


def test_a_pruned_beit_with_relative_position_biases_exports(make_model, helpers, tmp_path):
    """BEiT's relative position bias reaches the attention as a mask; exporting its fused attention failed in
    torch ("Cannot view a tensor"). Layer and shared biases at once, pruned to uneven widths."""
    model = make_model("beit_both_bias")
    apply_plan(model, helpers.random_plan(model, 1))
    before = model.config._attn_implementation
    result = export_onnx(model, tmp_path / "beit.onnx")
    assert model.config._attn_implementation == before  # the model is left as it was
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"pixel_values": IMAGES.numpy()})[0])
    with torch.no_grad():
        expected = model(pixel_values=IMAGES).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beit.onnx"]



def test_the_model_s_files_are_recognised_through_another_spelling_of_its_directory(saved, tmp_path, monkeypatch):
    """A symlinked directory is the same directory: its config.json is the model's."""
    before, calls = snapshot(saved), no_export(monkeypatch)
    (tmp_path / "alias").symlink_to(saved, target_is_directory=True)
    with pytest.raises(FileExistsError, match=r"config\.json is config\.json of the model being exported"):
        export_onnx(saved, tmp_path / "alias" / "config.json", overwrite=True)
    assert calls == [] and snapshot(saved) == before
