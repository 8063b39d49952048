"""Measured inference speed of a pruned model beside its dense reference, on this machine.

Both models run in the same process, interleaved (pruned, dense, dense, pruned, ...), in eval mode
under ``torch.no_grad()``, on random images of the configured size; each figure is the median of
``repeats`` timed runs after ``warmup`` untimed ones, so a background job slows both alike.
Speed does not depend on the weight values, so a dense reference rebuilt from the pruned config
(:func:`dense_counterpart`) times exactly like the original dense model.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


def hardware_name(device: torch.device | str | None = None) -> str:
    """The accelerator's name, or the CPU model from /proc/cpuinfo (platform's guess elsewhere)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of one image, from ``model.config`` (num_channels, image_size)."""
    config = model.config
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(getattr(config, "num_channels", 3)), int(height), int(width)


def dense_counterpart(model: nn.Module) -> nn.Module:
    """A freshly initialised model of the architecture ``model`` was pruned from (its dense widths).

    Reads only the config (``per_layer_config`` removed), so it needs neither the Hub nor the
    original weights; use it as the dense reference for timing, not for accuracy.
    """
    from .modeling import dense_view

    config = dense_view(model.config)
    reference = type(model)(config)
    parameter = next(model.parameters(), None)
    if parameter is not None:
        reference = reference.to(device=parameter.device, dtype=parameter.dtype)
    return reference.eval()


@contextmanager
def _inference_on(model: nn.Module, device: torch.device):
    """Eval mode on ``device`` for the duration; the model's mode and device are restored after."""
    parameter = next(model.parameters(), None)
    old_device = parameter.device if parameter is not None else device
    was_training = model.training
    model.eval().to(device)
    try:
        yield model
    finally:
        model.train(was_training)
        model.to(old_device)


def _timer(model: nn.Module, images: torch.Tensor, device: torch.device) -> Callable[[], float]:
    return lambda: _time(lambda: model(pixel_values=images), device)


def time_interleaved(timers: Mapping[tuple[str, str], Callable[[], float]], *, warmup: int, repeats: int
                     ) -> dict[tuple[str, str], float]:
    """The median seconds of each ``(model, batch)`` timer over ``repeats`` rounds after ``warmup`` untimed ones.

    Each round runs every batch kind for every model, the models in alternating order, so that drift
    (thermal, other jobs) hits them alike.
    """
    names = list(dict.fromkeys(name for name, _ in timers))
    kinds = list(dict.fromkeys(kind for _, kind in timers))
    times: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
    for step in range(warmup + repeats):
        for kind in kinds:
            for name in names if step % 2 == 0 else reversed(names):
                elapsed = timers[name, kind]()
                if step >= warmup:
                    times[name, kind].append(elapsed)
    return {key: statistics.median(values) for key, values in times.items()}


def speed_figures(medians: Mapping[tuple[str, str], float], batch_size_throughput: int) -> dict:
    """Latency (ms) and throughput (images/s) per model from :func:`time_interleaved`'s ``"latency"`` and
    ``"throughput"`` medians, and the ``"dense"``-to-``"pruned"`` speedups when both were timed."""
    names = list(dict.fromkeys(name for name, _ in medians))
    result: dict = {name: {"latency_ms": medians[name, "latency"] * 1000.0,
                           "throughput": batch_size_throughput / medians[name, "throughput"]} for name in names}
    if "dense" in result:
        result["latency_speedup"] = result["dense"]["latency_ms"] / result["pruned"]["latency_ms"]
        result["throughput_speedup"] = result["pruned"]["throughput"] / result["dense"]["throughput"]
    return result


def measure_speed(
    pruned: nn.Module,
    dense: nn.Module | None = None,
    *,
    batch_size_latency: int = 1,
    batch_size_throughput: int = 64,
    repeats: int = 5,
    warmup: int = 2,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict:
    """Latency (ms per batch of ``batch_size_latency``) and throughput (images/s at ``batch_size_throughput``).

    Returns a JSON-ready dict: ``pruned`` and (when ``dense`` is given) ``dense`` each with
    ``latency_ms`` and ``throughput``; ``latency_speedup`` and ``throughput_speedup`` (dense
    latency / pruned latency and pruned throughput / dense throughput, both > 1 when the pruned model
    is faster); ``hardware``, ``device``, ``torch_threads``, ``dtype``, the batch sizes, ``repeats``
    and ``warmup``. Models are timed on ``device`` (default: the pruned model's) and put back where
    they were afterwards.
    """
    for name, value, low in (
        ("batch_size_latency", batch_size_latency, 1),
        ("batch_size_throughput", batch_size_throughput, 1),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"measure_speed: {name}={value!r} must be an integer >= {low}.")
    parameter = next(pruned.parameters())
    device = torch.device(device) if device is not None else parameter.device
    dtype = parameter.dtype
    shape = input_shape(pruned)
    if dense is not None and input_shape(dense) != shape:
        raise ValueError(f"The dense model takes images of shape {input_shape(dense)}, the pruned one {shape}.")
    generator = torch.Generator().manual_seed(seed)
    batches = {
        "latency": torch.randn(batch_size_latency, *shape, generator=generator).to(device=device, dtype=dtype),
        "throughput": torch.randn(batch_size_throughput, *shape, generator=generator).to(device=device, dtype=dtype),
    }
    models = {"pruned": pruned} if dense is None else {"pruned": pruned, "dense": dense}
    with torch.no_grad(), _inference_on(pruned, device), (
        _inference_on(dense, device) if dense is not None else _nothing()
    ):
        timers = {(m, b): _timer(models[m], batches[b], device) for m in models for b in batches}
        medians = time_interleaved(timers, warmup=warmup, repeats=repeats)
    result = speed_figures(medians, batch_size_throughput)
    result.update(
        hardware=hardware_name(device),
        device=device.type,
        torch_threads=torch.get_num_threads() if device.type == "cpu" else None,
        dtype=str(dtype).removeprefix("torch."),
        batch_size_latency=batch_size_latency,
        batch_size_throughput=batch_size_throughput,
        repeats=repeats,
        warmup=warmup,
    )
    return result


def measured_latency_ratio(model: nn.Module, dense: nn.Module, batch_size: int, repeats: int, warmup: int = 2,
                           seed: int = 0) -> float:
    """``model``'s latency over ``dense``'s at ``batch_size``, timed interleaved on ``model``'s device (one batch
    size only, where :func:`measure_speed` times two)."""
    parameter = next(model.parameters())
    images = torch.randn(batch_size, *input_shape(model), generator=torch.Generator().manual_seed(seed))
    images = images.to(device=parameter.device, dtype=parameter.dtype)
    models = {"pruned": model, "dense": dense}
    with torch.no_grad(), _inference_on(model, parameter.device), _inference_on(dense, parameter.device):
        timers = {(name, "latency"): _timer(m, images, parameter.device) for name, m in models.items()}
        medians = time_interleaved(timers, warmup=warmup, repeats=repeats)
    return medians["pruned", "latency"] / medians["dense", "latency"]


@contextmanager
def _nothing():
    yield None


def layer_latency_table(model: nn.Module, token_counts: list[int], *, batch_size: int = 64, repeats: int = 5,
                        warmup: int = 2, device: torch.device | str | None = None, seed: int = 0,
                        stage: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Milliseconds each encoder layer of ``model`` takes for a batch of ``batch_size`` sequences of each of
    ``token_counts`` tokens, on this machine: what token pruning's latency-aware keep ratios read.

    Each figure is the median of ``repeats`` timed runs after ``warmup`` untimed ones; the counts are
    timed interleaved (every count once, then again), so drift hits them alike. Also the whole model's
    latency on images at that batch size (``model_ms``), which holds what the layers do not (embeddings,
    head), and, with ``stage`` (a token stage: a sequence in, a shorter one out), the stage's own time on
    each count (``stages_ms``): at batch 1 it can cost more than the layers save. JSON-ready:
    ``token_counts``, ``layers_ms`` (one list per layer), ``stages_ms`` (or None), ``model_ms``,
    ``hardware``, ``device``, ``torch_threads``, ``batch_size``, ``repeats``.
    """
    from .architectures import embedding_width, find_encoder_layers

    parameter = next(model.parameters())
    device = torch.device(device) if device is not None else parameter.device
    generator = torch.Generator().manual_seed(seed)
    width = embedding_width(model)
    hidden = {n: torch.randn(batch_size, n, width, generator=generator).to(device=device, dtype=parameter.dtype)
              for n in token_counts}
    images = torch.randn(batch_size, *input_shape(model), generator=generator).to(device=device, dtype=parameter.dtype)
    layers = [layer.module for layer in find_encoder_layers(model)]
    if stage is not None:  # timed like one more layer
        layers.append(stage)
    times = {(i, n): [] for i in range(len(layers)) for n in token_counts}
    whole = []
    with torch.no_grad(), _inference_on(model, device):
        for step in range(warmup + repeats):
            for i, layer in enumerate(layers):
                for n in token_counts if step % 2 == 0 else reversed(token_counts):
                    elapsed = _time(lambda: layer(hidden[n]), device)
                    if step >= warmup:
                        times[i, n].append(elapsed)
            elapsed = _time(lambda: model(pixel_values=images), device)
            if step >= warmup:
                whole.append(elapsed)
    rows = [[statistics.median(times[i, n]) * 1000.0 for n in token_counts] for i in range(len(layers))]
    return {
        "token_counts": list(token_counts),
        "layers_ms": rows[:-1] if stage is not None else rows,
        "stages_ms": rows[-1] if stage is not None else None,
        "model_ms": statistics.median(whole) * 1000.0,
        "hardware": hardware_name(device),
        "device": device.type,
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch_size": batch_size,
        "repeats": repeats,
    }


def _time(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
