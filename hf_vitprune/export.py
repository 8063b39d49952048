"""Export a pruned model to ONNX (``torch.onnx.export`` with the dynamo exporter) and check it in ONNX Runtime.

Every kind of model the project makes exports the same way: heterogeneous widths, a narrowed
embedding (OFB), token pruning (the stages keep a fixed number of tokens, so the graph is static
but for the batch) and convolution layers (SPViT). The batch dimension is dynamic. After the
export, the graph is run in ONNX Runtime on a batch of 1 and one of 7 random images and its
outputs are compared with PyTorch's; the file is written to a temporary name and renamed, so a
failed export leaves nothing behind.

Needs the ``onnx`` extra (``pip install "hf_vitprune[onnx]"``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .speed import _time, speed_figures, time_interleaved

MIN_OPSET = 18  # the dynamo exporter's lowest supported opset
CHECK_BATCH_SIZES = (1, 7)
EXTRA_HINT = 'pip install "hf_vitprune[onnx]" (onnx, onnxscript and onnxruntime)'


@dataclass(frozen=True)
class OnnxExport:
    """Where the graph went, and how far ONNX Runtime's outputs are from PyTorch's (max abs, per batch size)."""

    path: Path
    opset: int
    max_abs_diff: dict[int, float]


def load_pruned(model_dir: str | os.PathLike) -> nn.Module:
    """The pruned model saved in ``model_dir`` (eval mode), or a ValueError saying why it is not one."""
    from transformers import AutoConfig

    from .modeling import auto_class_for

    directory = Path(model_dir)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} has no config.json: pass a directory written by save_pretrained() of a model "
                         f"pruned by hf_vitprune.")
    config = AutoConfig.from_pretrained(directory)
    if not str(config.model_type).startswith("pruned_"):
        raise ValueError(
            f"{directory} holds a {config.model_type!r} model, not one pruned by hf_vitprune (model_type 'pruned_*'). "
            f"Prune it first (PruningTrainer, or apply_plan and save_pretrained), or export a dense model with "
            f"torch.onnx.export directly."
        )
    return auto_class_for(config).from_pretrained(directory).eval()


def export_onnx(model: nn.Module | str | os.PathLike, output: str | os.PathLike, opset: int = MIN_OPSET,
                atol: float = 1e-4) -> OnnxExport:
    """Export ``model`` (a pruned model, or the directory it was saved in) to ``output`` as ONNX with a dynamic
    batch, then check it in ONNX Runtime against PyTorch at batch sizes 1 and 7 (max abs difference <= ``atol``,
    else a RuntimeError and no file)."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset={opset!r} is not supported: the exporter (torch.onnx dynamo) writes opset "
                         f"{MIN_OPSET} or newer; pass --opset {MIN_OPSET} or higher.")
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"ONNX export needs onnxruntime (and onnx, onnxscript): {EXTRA_HINT}.") from None
    if not isinstance(model, nn.Module):
        model = load_pruned(model)
    model.eval()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    size = _image_size(model)
    example = torch.randn(2, model.config.num_channels, *size, generator=torch.Generator().manual_seed(0))
    staging = output.with_name(f".{output.name}.partial")
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(model, (), str(staging), kwargs={"pixel_values": example}, dynamo=True,
                          input_names=["pixel_values"], dynamic_shapes={"pixel_values": {0: batch}},
                          opset_version=opset, external_data=False, verbose=False)
        session = onnxruntime.InferenceSession(str(staging), providers=["CPUExecutionProvider"])
        differences = {}
        for batch_size in CHECK_BATCH_SIZES:
            images = torch.randn(batch_size, *example.shape[1:], generator=torch.Generator().manual_seed(batch_size))
            with torch.no_grad():
                expected = _first_output(model(pixel_values=images))
            got = torch.from_numpy(session.run(None, {"pixel_values": images.numpy()})[0])
            differences[batch_size] = float((got - expected).abs().max())
        worst = max(differences.values())
        if worst > atol:
            raise RuntimeError(f"ONNX Runtime's outputs differ from PyTorch's by up to {worst:.3g} (allowed {atol:g}) "
                               f"at batch sizes {dict(differences)}; the export is wrong, please report it.")
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    return OnnxExport(output, opset, differences)


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = model.config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _first_output(outputs) -> torch.Tensor:
    """The logits of a classifier, the last hidden state of a backbone: what the graph's first output is."""
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else outputs.last_hidden_state


def onnx_runtime_speed(model: nn.Module, reference: nn.Module, *, batch_size_throughput: int = 64, repeats: int = 5,
                       warmup: int = 2) -> dict:
    """Latency at batch 1 and throughput at ``batch_size_throughput`` of ``model`` and ``reference`` (its dense
    architecture) in ONNX Runtime on the CPU: both exported (and checked), then timed as
    :func:`hf_vitprune.speed.measure_speed` times models, with the same keys in its result."""
    import onnxruntime

    shape = (model.config.num_channels, *_image_size(model))
    generator = torch.Generator().manual_seed(0)
    batches = {"latency": torch.randn(1, *shape, generator=generator).numpy(),
               "throughput": torch.randn(batch_size_throughput, *shape, generator=generator).numpy()}
    with tempfile.TemporaryDirectory() as directory:
        sessions = {}
        for name, module in (("pruned", model), ("dense", reference)):
            path = export_onnx(module, Path(directory) / f"{name}.onnx").path
            sessions[name] = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    timers = {(name, kind): _session_timer(sessions[name], images) for name in sessions
              for kind, images in batches.items()}
    result = speed_figures(time_interleaved(timers, warmup=warmup, repeats=repeats), batch_size_throughput)
    result.update(runtime=f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)", batch_size_latency=1,
                  batch_size_throughput=batch_size_throughput, repeats=repeats, warmup=warmup)
    return result


def _session_timer(session, images) -> Callable[[], float]:
    return lambda: _time(lambda: session.run(None, {"pixel_values": images}), torch.device("cpu"))
