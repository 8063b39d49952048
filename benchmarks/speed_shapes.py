"""CPU throughput at real ViT shapes: does the measured speedup follow the FLOPs ratio?

For DeiT-Tiny (hidden 192, 3 heads, MLP 768), DeiT-Small (384, 6, 1536) and ViT-Base (768, 12, 3072),
12 layers, 224x224 images in 16x16 patches, random weights, SDPA attention:

1. each method's plan shapes at 30% and 50% parameter sparsity, without training: the in-project
   methods through their public hooks, as ``PruningTrainer`` runs them (``get_method(name)(config)``,
   ``method.setup(SearchContext(...))`` on a few random calibration images with random labels,
   ``method.finalize(model)``), then ``hf_vitprune.apply_plan``; ``torch_pruning`` by its own
   pruning (``benchmarks.torch_pruning_peer.prune_with_torch_pruning``);
2. throughput at batch 64, eager and ``torch.compile`` (mode default), dense and every pruned model of
   a shape timed round-robin in one process (dense, pruned 1, ..., pruned n; the order reversed every
   other round), ``torch.set_num_threads(threads)``, median of ``repeats`` rounds after ``warmup``
   rounds (eager warm-up at a batch of 8; a compiled model's compiling call at batch 64 is its
   warm-up); a compile error is recorded as text instead of a figure;
3. efficiency = (pruned throughput / dense throughput) / (dense FLOPs / pruned FLOPs), FLOPs from
   ``hf_vitprune.model_stats``.

Run alone (writes ``benchmarks/results/speed_shapes.json``)::

    python -m benchmarks.speed_shapes                  # the full preset: an estimated 15-20 min on 2 idle cores
    python -m benchmarks.speed_shapes --repeats 1 --warmup 0 --shapes deit_tiny   # a quick look

``benchmarks.run`` runs it after the accuracy runs (the ``full`` preset; ``--quick`` runs the
``quick`` preset: a 2-layer DeiT-Tiny at 32x32, eager only) and puts the section in BENCHMARKS.md.
The ``full`` preset's time cuts, in the JSON's ``notes`` and printed: ViT-Base gets 3 rounds and only
gohsp's and torch_pruning's plans; ``torch.compile`` runs at DeiT-Small (the target shape) only, for
dense and gohsp.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

from hf_vitprune import PruningConfig, apply_plan, model_stats
from hf_vitprune.methods import SearchContext, get_method
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
    # ~15 minutes on 2 cores: one dense ViT-Base forward at batch 64 takes about half a minute there, so
    # ViT-Base gets 3 rounds and only gohsp's and torch_pruning's plans; torch.compile (about a minute of
    # compiling per model on 2 cores, several on a busy machine) runs at the target shape only, for dense
    # and gohsp (``--compile_methods gohsp torch_pruning`` adds the peer).
    "full": dict(shapes=["deit_tiny", "deit_small", "vit_base"], sparsities=[0.3, 0.5], repeats=5, warmup=1,
                 repeats_by_shape={"vit_base": 3}, methods_by_shape={"vit_base": ["gohsp", TORCH_PRUNING]},
                 compile_methods=["gohsp"], compile_shapes=[TARGET_SHAPE], batch_size=64,
                 warmup_batch_size=8, threads=2, calibration_images=8, overrides={}),
    # the benchmark's --quick mode: the pipeline, not the figures
    "quick": dict(shapes=["deit_tiny"], sparsities=[0.3, 0.5], repeats=5, warmup=1, repeats_by_shape={},
                  methods_by_shape={}, compile_methods=[], compile_shapes=[], batch_size=64, warmup_batch_size=8,
                  threads=2, calibration_images=4, overrides={"num_hidden_layers": 2, "image_size": 32}),
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


def plan_model(method: str, dense, sparsity: float, calibration: list[dict]):
    """A copy of ``dense`` pruned to ``method``'s plan shapes at ``sparsity`` (no training)."""
    import copy

    if method == TORCH_PRUNING:
        return prune_with_torch_pruning(dense, sparsity, calibration)[0].eval()
    model = copy.deepcopy(dense)
    config = PruningConfig(method=method, target_sparsity=sparsity, calibration_samples=len(calibration[0]["labels"]))
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
    config = dense.config
    images = torch.randn(preset["batch_size"], config.num_channels, config.image_size, config.image_size,
                         generator=torch.Generator().manual_seed(1))
    repeats = preset["repeats_by_shape"].get(shape, preset["repeats"])
    result = {"shape": shape, "config": {**COMMON, **SHAPES[shape], **preset["overrides"]},
              "dense": {"params": dense_stats.params, "flops": dense_stats.flops}, "runs": rows,
              "repeats": repeats, "warmup": preset["warmup"], "warmup_batch_size": preset["warmup_batch_size"],
              "modes": {}}
    eager = {"dense": dense, **pruned}
    started = time.perf_counter()
    seconds = time_round_robin(eager, images, repeats, preset["warmup"], images[: preset["warmup_batch_size"]])
    result["modes"]["eager"] = _throughputs(seconds, preset["batch_size"], rows, time.perf_counter() - started)
    log(f"{shape} eager: {_describe(result['modes']['eager'])}")
    if shape in preset["compile_shapes"] and preset["compile_methods"]:
        chosen = {key: model for key, model in eager.items()
                  if key == "dense" or key.split("@")[0] in preset["compile_methods"]}
        started = time.perf_counter()
        try:
            compiled = {key: _compiled(model) for key, model in chosen.items()}
            with torch.no_grad():
                for model in compiled.values():
                    model(pixel_values=images)  # the compile itself at batch 64, untimed: also the warm-up
            compile_seconds = time.perf_counter() - started
            started = time.perf_counter()
            seconds = time_round_robin(compiled, images, repeats)  # no other batch size: no recompiling
            entry = _throughputs(seconds, preset["batch_size"], [r for r in rows if r["key"] in chosen],
                                 time.perf_counter() - started)
            entry["compile_seconds"] = compile_seconds
        except Exception as error:  # noqa: BLE001  (a compiler missing on this machine: record, do not crash)
            entry = {"error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        result["modes"]["compile"] = entry
        log(f"{shape} compile: {_describe(entry)}")
    return result


def _throughputs(seconds: dict[str, float], batch: int, rows: list[dict], wall: float) -> dict:
    dense = batch / seconds["dense"]
    out = {"dense_throughput": dense, "timing_seconds": wall, "runs": {}}
    for row in rows:
        throughput = batch / seconds[row["key"]]
        speedup = throughput / dense
        out["runs"][row["key"]] = {"throughput": throughput, "throughput_speedup": speedup,
                                   "efficiency": speedup / row["flops_speedup"]}
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
    if preset["repeats_by_shape"]:
        notes.append("fewer repeats for " + ", ".join(f"{s} ({n})" for s, n in preset["repeats_by_shape"].items())
                     + f" than the other shapes ({preset['repeats']}), to fit the time budget")
    for shape, names in preset["methods_by_shape"].items():
        if shape in preset["shapes"]:
            notes.append(f"only {', '.join(names)} plans at {shape}")
    notes.append(f"warm-up rounds run at batch {preset['warmup_batch_size']} (eager); compiled models are warmed by "
                 f"their compiling call at batch {preset['batch_size']}")
    skipped = [s for s in preset["shapes"] if s not in preset["compile_shapes"]]
    if skipped:
        notes.append(f"torch.compile not measured at {', '.join(skipped)}")
    if preset["compile_methods"]:
        notes.append(f"torch.compile measured for {', '.join(preset['compile_methods'])} (and dense) only")
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
