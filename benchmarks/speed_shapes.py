"""CPU speed at real ViT shapes: does the measured speedup follow the FLOPs ratio, at batch 1 and 64, in eager
PyTorch, under ``torch.compile`` and in ONNX Runtime?

For DeiT-Tiny (hidden 192, 3 heads, MLP 768), DeiT-Small (384, 6, 1536) and ViT-Base (768, 12, 3072),
12 layers, 224x224 images in 16x16 patches, random weights, SDPA attention:

1. each method's plan shapes at 30% and 50% parameter sparsity, without training: the in-project
   methods through their public hooks, as ``PruningTrainer`` runs them (``get_method(name)(config)``,
   ``method.setup(SearchContext(...))`` on a few random calibration images with random labels,
   ``method.finalize(model)``), then ``hf_vitprune.apply_plan``; ``torch_pruning`` by its own
   pruning (``benchmarks.torch_pruning_peer.prune_with_torch_pruning``); gohsp's plans again with
   ``round_neurons_to=64`` (``gohsp_round64``: do widths a kernel divides evenly keep the speedup?); and
   two rows made without a plan of heads and neurons: ``spvit_tokens`` at 35% fewer FLOPs (the stages
   the method chooses, untrained selectors) and ``conv_hybrid`` (layer 0 a 3x3 convolution, then MLP
   neurons by weight magnitude to each parameter sparsity);
2. throughput at batch 64 and latency at batch 1, in eager PyTorch, ``torch.compile`` (mode default)
   and ONNX Runtime (the model exported by ``hf_vitprune.export_onnx``), dense and every pruned model
   of a shape timed round-robin in one process (dense, pruned 1, ..., pruned n; the order reversed every
   other round), ``torch.set_num_threads(threads)``, median of ``repeats`` rounds (``latency_repeats``
   at batch 1) after ``warmup`` rounds (eager warm-up at a batch of 8; a compiled model's compiling call
   at each batch size is its warm-up); a compile or export error is recorded as text instead of a figure;
3. efficiency = (pruned throughput / dense throughput) / (dense FLOPs / pruned FLOPs), FLOPs from
   ``hf_vitprune.model_stats``.

Run alone (writes ``benchmarks/results/speed_shapes.json``)::

    python -m benchmarks.speed_shapes                  # the full preset: an estimated 60 min on 2 idle cores
    python -m benchmarks.speed_shapes --repeats 1 --warmup 0 --shapes deit_tiny   # a quick look

``benchmarks.run`` runs it after the accuracy runs (the ``full`` preset; ``--quick`` runs the
``quick`` preset: a 2-layer DeiT-Tiny at 32x32, eager only) and puts the section in BENCHMARKS.md.
The ``full`` preset's time cuts, in the JSON's ``notes`` and printed: ViT-Base gets 3 rounds and only
gohsp's and torch_pruning's plans and no extra rows; ``torch.compile`` runs at DeiT-Small (the target
shape) only, for every model; ONNX Runtime at DeiT-Tiny and DeiT-Small.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

from hf_vitprune import PruningConfig, apply_plan, model_stats
from hf_vitprune.architectures import find_encoder_layers
from hf_vitprune.budget import Budget, select_plan
from hf_vitprune.export import export_onnx
from hf_vitprune.methods import SearchContext, get_method
from hf_vitprune.surgery import convert_attention
from hf_vitprune.speed import hardware_name

from .common import FASHION_MNIST, parameter_matched
from .torch_pruning_peer import NAME as TORCH_PRUNING, prune_with_torch_pruning

SHAPES = {
    "deit_tiny": dict(hidden_size=192, num_attention_heads=3, intermediate_size=768),
    "deit_small": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
    "vit_base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
COMMON = dict(num_hidden_layers=12, image_size=224, patch_size=16, num_channels=3, num_labels=1000)
TARGET_SHAPE = "deit_small"  # the throughput / FLOPs target is read at this shape

PRESETS = {
    # one dense ViT-Base forward at batch 64 takes about half a minute on 2 cores, so ViT-Base gets 3 rounds
    # and only gohsp's and torch_pruning's plans; torch.compile (about a minute of compiling per model and
    # batch size on 2 cores) runs at the target shape only (``--compile_methods gohsp`` limits it to one plan)
    "full": dict(shapes=["deit_tiny", "deit_small", "vit_base"], sparsities=[0.3, 0.5], repeats=5, warmup=1,
                 repeats_by_shape={"vit_base": 3}, methods_by_shape={"vit_base": ["gohsp", TORCH_PRUNING]},
                 compile_methods="all", compile_shapes=[TARGET_SHAPE], batch_size=64,
                 warmup_batch_size=8, threads=2, calibration_images=8, overrides={},
                 latency_repeats=15, onnx_shapes=["deit_tiny", TARGET_SHAPE], token_reductions=[0.35],
                 round_neurons={"gohsp": 64},
                 extra_row_shapes=["deit_tiny", TARGET_SHAPE]),
    # the benchmark's --quick mode: the pipeline, not the figures
    "quick": dict(shapes=["deit_tiny"], sparsities=[0.3, 0.5], repeats=5, warmup=1, repeats_by_shape={},
                  methods_by_shape={}, compile_methods=[], compile_shapes=[], batch_size=64, warmup_batch_size=8,
                  threads=2, calibration_images=4, overrides={"num_hidden_layers": 2, "image_size": 32},
                  latency_repeats=5, onnx_shapes=[], token_reductions=[], round_neurons={}, extra_row_shapes=[]),
}


def dense_model(shape: str, overrides: dict | None = None, seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(**{**COMMON, **SHAPES[shape], **(overrides or {})}, attn_implementation="sdpa")
    return ViTForImageClassification(config).eval()


def calibration_batches(model, count: int, seed: int = 0) -> list[dict]:
    """Random images and labels (the weights are random too: only the plan's shapes matter here)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    images = torch.randn(count, config.num_channels, config.image_size, config.image_size, generator=generator)
    labels = torch.randint(0, config.num_labels, (count,), generator=generator)
    return [{"pixel_values": images, "labels": labels}]


def plan_model(method: str, dense, sparsity: float, calibration: list[dict], **config_fields):
    """A copy of ``dense`` pruned to ``method``'s plan shapes at ``sparsity`` (no training); ``config_fields`` go
    to its ``PruningConfig`` (``round_neurons_to=64``)."""
    if method == TORCH_PRUNING:
        return prune_with_torch_pruning(dense, sparsity, calibration)[0].eval()
    model = copy.deepcopy(dense)
    config = PruningConfig(method=method, target_sparsity=sparsity, calibration_samples=len(calibration[0]["labels"]),
                           **config_fields)
    search = get_method(method)(config)
    search.setup(SearchContext(model=model, budget=config.budget, search_steps=search.search_steps(100),
                               calibration_batches=lambda: iter(calibration), seed=0))
    plan = search.finalize(model)
    apply_plan(model, plan)
    return model.eval()


def _compiled(model):
    return torch.compile(model, mode="default")


def time_round_robin(models: dict, images: torch.Tensor, repeats: int, warmup: int = 0,
                     warmup_images: torch.Tensor | None = None) -> dict[str, float]:
    """Median seconds per forward of every model, timed in alternating round-robin order.

    ``warmup`` untimed rounds first, on ``warmup_images`` (default: ``images``; a smaller batch warms the
    kernels and the allocator for a fraction of the time a ViT-Base batch of 64 takes).
    """
    times = {name: [] for name in models}
    order = list(models)
    with torch.no_grad():
        for step in range(warmup + repeats):
            batch = images if step >= warmup or warmup_images is None else warmup_images
            for name in order if step % 2 == 0 else reversed(order):
                started = time.perf_counter()
                models[name](pixel_values=batch)
                if step >= warmup:
                    times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_shape(shape: str, preset: dict, methods: list[str], log=print) -> dict:
    """Plans, FLOPs and throughput (eager and compiled) of every method and sparsity at one shape."""
    dense = dense_model(shape, preset["overrides"])
    dense_stats = model_stats(dense)
    calibration = calibration_batches(dense, preset["calibration_images"])
    pruned, rows = {}, []
    chosen_methods = [m for m in methods if m in preset["methods_by_shape"].get(shape, methods)]
    for method in chosen_methods:
        for sparsity in preset["sparsities"]:
            started = time.perf_counter()
            model = plan_model(method, dense, sparsity, calibration)
            stats = model_stats(model)
            key = f"{method}@{sparsity:g}"
            pruned[key] = model
            rows.append({"method": method, "sparsity": sparsity, "key": key, "params": stats.params,
                         "flops": stats.flops, "achieved_sparsity": 1 - stats.params / dense_stats.params,
                         "flops_speedup": dense_stats.flops / stats.flops,
                         "heads_per_layer": [layer.heads for layer in stats.layers],
                         "neurons_per_layer": [layer.neurons for layer in stats.layers],
                         "plan_seconds": time.perf_counter() - started})
            log(f"{shape} {key}: params {stats.params:,} ({rows[-1]['achieved_sparsity']:.1%} removed), "
                f"FLOPs x{rows[-1]['flops_speedup']:.2f}")
    if shape in preset["extra_row_shapes"]:
        for method, multiple in preset["round_neurons"].items():  # plans with their MLP widths rounded
            for sparsity in preset["sparsities"]:
                model = plan_model(method, dense, sparsity, calibration, round_neurons_to=multiple)
                rows.append(_extra_row(dense, dense_stats, f"{method}_round{multiple}", sparsity,
                                       f"{sparsity:.0%} params, MLP widths multiples of {multiple}", model, pruned,
                                       log, shape))
        for reduction in preset["token_reductions"]:
            rows.append(_extra_row(dense, dense_stats, "spvit_tokens", reduction, f"{reduction:.0%} FLOPs",
                                   token_pruned(dense, reduction), pruned, log, shape))
        for sparsity in preset["sparsities"]:
            rows.append(_extra_row(dense, dense_stats, "conv_hybrid", sparsity, f"{sparsity:.0%} params",
                                   conv_hybrid(dense, sparsity), pruned, log, shape))
    config = dense.config
    images = torch.randn(preset["batch_size"], config.num_channels, config.image_size, config.image_size,
                         generator=torch.Generator().manual_seed(1))
    repeats = preset["repeats_by_shape"].get(shape, preset["repeats"])
    result = {"shape": shape, "config": {**COMMON, **SHAPES[shape], **preset["overrides"]},
              "dense": {"params": dense_stats.params, "flops": dense_stats.flops}, "runs": rows,
              "repeats": repeats, "latency_repeats": preset["latency_repeats"], "warmup": preset["warmup"],
              "warmup_batch_size": preset["warmup_batch_size"], "modes": {}}
    eager = {"dense": dense, **pruned}
    timings = {"eager": eager}
    if shape in preset["onnx_shapes"]:
        timings["onnxruntime"] = None  # exported below, in a temporary directory
    if shape in preset["compile_shapes"] and preset["compile_methods"]:
        timings["compile"] = {key: model for key, model in eager.items()
                              if key == "dense" or preset["compile_methods"] == "all"
                              or key.split("@")[0] in preset["compile_methods"]}
    with tempfile.TemporaryDirectory() as exports:
        for mode, models in timings.items():
            started = time.perf_counter()
            try:
                if mode == "onnxruntime":
                    models = {key: onnx_runtime_model(model, Path(exports) / f"{key}.onnx", preset["threads"])
                              for key, model in eager.items()}
                elif mode == "compile":
                    models = {key: _compiled(model) for key, model in models.items()}
                prepared = time.perf_counter() - started
                for suffix, batch, count in (("", images, repeats), ("_b1", images[:1], preset["latency_repeats"])):
                    started = time.perf_counter()
                    if mode == "compile":  # the compile itself at this batch size, untimed: also the warm-up
                        with torch.no_grad():
                            for model in models.values():
                                model(pixel_values=batch)
                    warmup = preset["warmup"] if mode != "compile" else 0
                    seconds = time_round_robin(models, batch, count, warmup,
                                               batch[: preset["warmup_batch_size"]] if mode == "eager" else None)
                    entry = _throughputs(seconds, len(batch), [r for r in rows if r["key"] in models],
                                         time.perf_counter() - started)
                    entry["prepare_seconds"] = prepared
                    result["modes"][mode + suffix] = entry
                    log(f"{shape} {mode + suffix}: {_describe(entry)}")
            except Exception as error:  # noqa: BLE001  (a compiler or exporter failing here: record, do not crash)
                entry = {"error": f"{type(error).__name__}: {error}"[:2000],
                         "traceback": traceback.format_exc()[-4000:]}
                result["modes"][mode] = entry
                log(f"{shape} {mode}: {_describe(entry)}")
    return result


def _extra_row(dense, dense_stats, method: str, budget: float, label: str, model, pruned: dict, log,
               shape: str) -> dict:
    """A row for a model made without a plan of heads and neurons (token stages, a conv hybrid)."""
    stats = model_stats(model)
    key = f"{method}@{budget:g}"
    pruned[key] = model
    row = {"method": method, "sparsity": 1 - stats.params / dense_stats.params, "budget": label, "key": key,
           "params": stats.params, "flops": stats.flops, "achieved_sparsity": 1 - stats.params / dense_stats.params,
           "flops_speedup": dense_stats.flops / stats.flops, "heads_per_layer": [layer.heads for layer in stats.layers],
           "neurons_per_layer": [layer.neurons for layer in stats.layers],
           "tokens_per_layer": [layer.tokens for layer in stats.layers],
           "layer_types": [layer.layer_type or "attention" for layer in stats.layers]}
    log(f"{shape} {key}: params {stats.params:,}, FLOPs x{row['flops_speedup']:.2f}")
    return row


def token_path(dense, **config_fields):
    """A copy of ``dense`` with the token path ``spvit_tokens`` chooses for ``config_fields`` (a FLOPs or latency
    budget and the method's options; its selectors untrained: they cost what trained ones cost), and the method."""
    model = copy.deepcopy(dense)
    config = PruningConfig(method="spvit_tokens", **config_fields)
    method = get_method("spvit_tokens")(config)
    method.setup(SearchContext(model=model, budget=config.budget, search_steps=10,
                               calibration_batches=lambda: iter(())))
    method.finalize(model)
    return model.eval(), method


def token_pruned(dense, reduction: float, **method_options):
    """:func:`token_path`'s model at ``target_flops_reduction=reduction``."""
    return token_path(dense, target_flops_reduction=reduction, **method_options)[0]


def conv_hybrid(dense, sparsity: float):
    """A copy of ``dense`` whose first layer is a 3x3 convolution (what SPViT's DeiT-S search chose), its MLP neurons
    cut by weight magnitude until ``sparsity`` of the dense parameters are gone."""
    model = convert_attention(copy.deepcopy(dense), {0: "conv3x3"})
    remaining = 1 - (1 - sparsity) * model_stats(dense).params / model_stats(model).params
    scores = [layer.mlp_out.weight.detach().norm(dim=0) for layer in find_encoder_layers(model)]
    plan = select_plan(model, neuron_scores=scores, budget=Budget("params", remaining), prune_heads=False)
    apply_plan(model, plan)
    return model.eval()


class OnnxRuntimeModel:
    """An exported model in an ONNX Runtime session, called like the PyTorch model (``pixel_values=``)."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixel_values: torch.Tensor):
        return self.session.run(None, {"pixel_values": pixel_values.numpy()})


def onnx_runtime_model(model, path: Path, threads: int) -> OnnxRuntimeModel:
    """``model`` exported with ``hf_vitprune.export_onnx`` (checked against PyTorch there) and loaded in ORT."""
    export_onnx(model, path)
    return OnnxRuntimeModel(path, threads)


def _throughputs(seconds: dict[str, float], batch: int, rows: list[dict], wall: float) -> dict:
    dense = batch / seconds["dense"]
    out = {"batch_size": batch, "dense_throughput": dense, "dense_latency_ms": 1000 * seconds["dense"],
           "timing_seconds": wall, "runs": {}}
    for row in rows:
        throughput = batch / seconds[row["key"]]
        speedup = throughput / dense
        out["runs"][row["key"]] = {"throughput": throughput, "latency_ms": 1000 * seconds[row["key"]],
                                   "throughput_speedup": speedup, "efficiency": speedup / row["flops_speedup"]}
    return out


def _describe(entry: dict) -> str:
    if "error" in entry:
        return "failed: " + entry["error"].splitlines()[0][:200]
    return ", ".join(f"{key} x{run['throughput_speedup']:.2f} (eff {run['efficiency']:.2f})"
                     for key, run in entry["runs"].items())


def run(preset_name: str = "full", *, methods: list[str] | None = None, output: Path | None = None,
        log=print, **overrides) -> dict:
    """Measure every shape of the preset; write the JSON to ``output`` when given; return the results."""
    preset = {**PRESETS[preset_name], **{k: v for k, v in overrides.items() if v is not None}}
    # the benchmark's parameter-matched methods, torch_pruning included (OFB's widths need its training-time search)
    methods = methods or parameter_matched(FASHION_MNIST["methods"])
    previous = torch.get_num_threads()
    torch.set_num_threads(preset["threads"])
    started = time.perf_counter()
    notes = []
    fewer = {s: n for s, n in preset["repeats_by_shape"].items() if s in preset["shapes"]}
    if fewer:
        notes.append("fewer repeats for " + ", ".join(f"{s} ({n})" for s, n in fewer.items())
                     + f" than the other shapes ({preset['repeats']}), to fit the time budget")
    for shape, names in preset["methods_by_shape"].items():
        if shape in preset["shapes"]:
            notes.append(f"only {', '.join(names)} plans at {shape}")
    notes.append(f"warm-up rounds run at batch {preset['warmup_batch_size']} (eager); compiled models are warmed by "
                 f"their compiling call at each batch size")
    for runtime, where in (("torch.compile", preset["compile_shapes"] if preset["compile_methods"] else []),
                           ("ONNX Runtime", preset["onnx_shapes"])):
        skipped = [s for s in preset["shapes"] if s not in where]
        if skipped:
            notes.append(f"{runtime} not measured at {', '.join(skipped)}")
    if preset["compile_methods"] and preset["compile_methods"] != "all":
        notes.append(f"torch.compile measured for {', '.join(preset['compile_methods'])} (and dense) only")
    unhybrid = [s for s in preset["shapes"] if s not in preset["extra_row_shapes"]]
    if preset["extra_row_shapes"] and unhybrid:
        notes.append(f"no spvit_tokens or conv_hybrid rows at {', '.join(unhybrid)}")
    short = [s for s in preset["shapes"] if preset["repeats_by_shape"].get(s, preset["repeats"]) < 5]
    if short:
        notes.append(f"fewer than 5 timed rounds at {', '.join(short)}: a smoke check, not a measurement")
    for note in notes:
        log("note: " + note)
    try:
        shapes = [measure_shape(shape, preset, methods, log) for shape in preset["shapes"]]
    finally:
        torch.set_num_threads(previous)
    results = {"preset": preset_name, "settings": {**preset, "methods": methods}, "notes": notes,
               "target_shape": TARGET_SHAPE, "hardware": hardware_name("cpu"), "torch": torch.__version__,
               "shapes": shapes, "total_seconds": time.perf_counter() - started}
    log(f"speed_shapes: {results['total_seconds']:.0f} s")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {output}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="Only these shapes.")
    parser.add_argument("--methods", nargs="+", help="Only these methods (in-project names or torch_pruning).")
    parser.add_argument("--repeats", type=int, help="Timed rounds per shape (ViT-Base keeps its own unless set).")
    parser.add_argument("--warmup", type=int, help="Untimed rounds first.")
    parser.add_argument("--no_compile", action="store_true", help="Eager only.")
    parser.add_argument("--compile_shapes", nargs="+", choices=sorted(SHAPES), help="Compile at these shapes.")
    parser.add_argument("--compile_methods", nargs="+", help="Compile these methods' plans (and dense).")
    parser.add_argument("--output", default="benchmarks/results/speed_shapes.json")
    args = parser.parse_args(argv)
    overrides = {"shapes": args.shapes, "repeats": args.repeats, "warmup": args.warmup}
    if args.repeats is not None:
        overrides["repeats_by_shape"] = {}
    if args.no_compile:
        overrides["compile_shapes"] = []
    if args.compile_shapes:
        overrides["compile_shapes"] = args.compile_shapes
    if args.compile_methods:
        overrides["compile_methods"] = args.compile_methods
    run(args.preset, methods=args.methods, output=Path(args.output), **overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
