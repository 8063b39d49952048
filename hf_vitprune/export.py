"""Export a pruned model to ONNX (``torch.onnx.export`` with the dynamo exporter) and check it in ONNX Runtime.

Every kind of model the project makes exports the same way: heterogeneous widths, a narrowed
embedding (OFB), token pruning (the stages keep a fixed number of tokens, so the graph is static
but for the batch) and convolution layers (SPViT). The batch dimension is dynamic. After the
export, the graph is run in ONNX Runtime on a batch of 1 and one of 7 random images and its
outputs are compared with PyTorch's; the file is written to a temporary name and renamed, so a
failed export leaves nothing behind. An export never writes over a file of the model it reads, nor over
any existing file unless asked to (``overwrite=True``, ``--overwrite``); the staging file a killed
export left behind is removed by the next export to the same output.

BEiT's attention adds its relative position bias as an attention mask, and torch's exporter turns
PyTorch's fused attention with a mask into ops whose memory layout breaks BEiT's reshape ("Cannot view
a tensor"); models with a relative position bias are therefore traced with the eager attention (the
same arithmetic), and checked against the model as it is.

Needs the ``onnx`` extra (``pip install "hf_vitprune[onnx]"``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .fileio import is_stale_staging, lock_staging, staging_path
from .speed import _time, speed_figures, time_interleaved

MIN_OPSET = 18  # the dynamo exporter's lowest supported opset
CHECK_BATCH_SIZES = (1, 7)
EXTRA_HINT = 'pip install "hf_vitprune[onnx]" (onnx, onnxscript and onnxruntime)'
FALLBACK_MAX_OPSET = 23  # torch's own ONNX_MAX_OPSET, if onnxscript's converter does not say
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnnxExport:
    """Where the graph went, and how far ONNX Runtime's outputs are from PyTorch's (max abs, per batch size)."""

    path: Path
    opset: int
    max_abs_diff: dict[int, float]
    removed_stale: tuple[Path, ...] = ()  # staging files of killed exports to the same output, removed first


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
                atol: float = 1e-4, overwrite: bool = False) -> OnnxExport:
    """Export ``model`` (a pruned model, or the directory it was saved in) to ``output`` as ONNX with a dynamic
    batch, then check it in ONNX Runtime against PyTorch at batch sizes 1 and 7 (max abs difference <= ``atol``,
    else a RuntimeError and no file). An existing ``output`` is replaced only with ``overwrite=True``, and never
    when it is a file of the model directory being exported."""
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise ValueError(f"atol={atol!r} is not a tolerance: pass a number >= 0, the largest max abs difference "
                         f"allowed between ONNX Runtime's and PyTorch's outputs (default 1e-4).")
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"ONNX export needs onnxruntime (and onnx, onnxscript): {EXTRA_HINT}.") from None
    highest = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest:
        raise ValueError(f"opset={opset!r} is not supported: the installed exporter (torch {torch.__version__}, "
                         f"torch.onnx dynamo) writes opsets {MIN_OPSET} to {highest}; pass --opset between "
                         f"{MIN_OPSET} and {highest}.")
    output = Path(output)
    source = Path(model) if not isinstance(model, nn.Module) else _loaded_from(model)
    _check_output(output, source, overwrite)
    if not isinstance(model, nn.Module):
        model = load_pruned(source)
    model.eval()
    removed = _remove_stale_staging(output)
    size = _image_size(model)
    example = torch.randn(2, model.config.num_channels, *size, generator=torch.Generator().manual_seed(0))
    with _claim_staging(output) as (staging, descriptor):
        batch = torch.export.Dim("batch", min=1, max=4096)
        with _traceable_attention(model):
            program = torch.onnx.export(model, (), None, kwargs={"pixel_values": example}, dynamo=True,
                                        input_names=["pixel_values"], dynamic_shapes={"pixel_values": {0: batch}},
                                        opset_version=opset, verbose=False)
        try:  # into the locked staging file itself (torch's own save would replace it by another file)
            with open(descriptor, "wb", closefd=False) as file:
                file.write(program.model_proto.SerializeToString())
            os.fsync(descriptor)
        except OSError as error:  # a full disk, a quota, a file-size limit, a file system gone read-only
            raise _write_error(output, error) from error
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
        if not overwrite and (output.exists() or output.is_symlink()):  # appeared while exporting
            raise FileExistsError(_exists_message(output))
        try:
            os.replace(staging, output)
        except OSError as error:
            raise _write_error(output, error) from error
    return OnnxExport(output, opset, differences, removed)


def max_opset() -> int:
    """The newest opset the installed exporter writes: torch exports opset 18 and onnxscript's version converter
    takes it up to its SUPPORTED_MAX_ONNX_OPSET (a higher opset fails after the export with two tracebacks)."""
    try:
        from onnxscript.version_converter import _version_converter

        highest = int(_version_converter.SUPPORTED_MAX_ONNX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):
        highest = FALLBACK_MAX_OPSET
    try:
        import onnx

        highest = min(highest, onnx.defs.onnx_opset_version())
    except (ImportError, AttributeError):
        pass
    return max(highest, MIN_OPSET)


def _loaded_from(model: nn.Module) -> Path | None:
    """The directory a model was loaded from (``from_pretrained`` records it), whose files it must not write over."""
    recorded = getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def _exists_message(output: Path) -> str:
    return (f"{output} already exists; pass --overwrite (overwrite=True) to replace it, or choose another --output.")


def _check_output(output: Path, source: Path | None, overwrite: bool) -> None:
    """Refuse, before any work, an output that is a directory, a file of the model being read, or (without
    ``overwrite``) any existing file."""
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a directory; name the file to write, e.g. "
                                f"--output {output / 'model.onnx'}.")
    # an entry of the model's directory (however the path spells it; a Hub cache's are symlinks), but earlier
    # graphs; the rename replaces the entry itself, so a link elsewhere to a model file is not written through
    exists = output.exists() or output.is_symlink()
    if (source is not None and exists and output.suffix != ".onnx" and source.is_dir()
            and output.parent.resolve() == source.resolve()):
        raise FileExistsError(
            f"--output {output} is {output.name} of the model being exported ({source}); writing the graph there "
            f"would destroy the model, so this is refused even with --overwrite. Choose another --output, e.g. "
            f"{source / 'model.onnx'}.")
    if not overwrite and exists:
        raise FileExistsError(_exists_message(output))


def _staging_pattern(output: Path) -> re.Pattern:
    """This project's staging names for ``output``: ``.NAME.<16 hex>.partial`` (and ``.NAME.partial`` of older
    versions)."""
    return re.compile(rf"\.{re.escape(output.name)}(\.[0-9a-f]{{16}})?\.partial")


@contextlib.contextmanager
def _claim_staging(output: Path) -> Iterator[tuple[Path, int]]:
    """Create the staging file beside ``output`` (proving the directory writable before exporting) and hold a
    lock on it while the export runs, so that a concurrent export's cleanup leaves it alone; remove it at the
    end unless it was renamed into place."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_path(output.parent, output.name)
        descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise _write_error(output, error, before=True) from error
    lock = lock_staging(staging)
    try:
        yield staging, descriptor
    finally:
        os.close(descriptor)
        if lock is not None:
            os.close(lock)
        staging.unlink(missing_ok=True)


def _remove_stale_staging(output: Path) -> tuple[Path, ...]:
    """Remove the staging files of exports to ``output`` that were killed (no live process holds their lock)."""
    if not output.parent.is_dir():
        return ()
    pattern, removed = _staging_pattern(output), []
    for entry in sorted(output.parent.iterdir()):
        if not pattern.fullmatch(entry.name) or not entry.is_file() or entry.is_symlink():
            continue
        if not is_stale_staging(entry):  # a running export's file
            continue
        try:
            entry.unlink()
        except OSError:
            continue
        logger.info("Removed %s, left by an export to %s that was interrupted.", entry, output)
        removed.append(entry)
    return tuple(removed)


def _write_error(output: Path, error: OSError, before: bool = False) -> OSError:
    reason = error.strerror or str(error)
    when = "nothing was exported" if before else "nothing was written there"
    return OSError(f"cannot write {output}: {reason} ({when}). Free some space or make the directory writable, or "
                   f"choose another --output.")


@contextlib.contextmanager
def _traceable_attention(model: nn.Module) -> Iterator[None]:
    """Trace a model with a relative position bias (BEiT) with the eager attention: torch's exporter decomposes
    the fused attention with a mask into ops whose layout makes BEiT's later reshape fail ("Cannot view a
    tensor"). The implementation the model had is put back afterwards."""
    current = getattr(model.config, "_attn_implementation", None)
    biased = any(hasattr(module, "relative_position_bias_table") for module in model.modules())
    if not biased or current in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(current)


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
