"""Token pruning's speed at real ViT shapes: do the stages pay for themselves at batch 1?

For DeiT-Tiny and DeiT-Small shapes (``benchmarks.speed_shapes``: 12 layers, 224x224 images in 16x16
patches, random weights, SDPA) and the 50-token benchmark model's shape (``benchmarks.tokens``: hidden 96,
4 layers, 28x28 images in 4x4 patches), each row is a token-pruned copy of the dense model, its stages
chosen by ``spvit_tokens`` itself (``method.setup`` as ``PruningTrainer`` runs it; untrained selectors,
which cost what trained ones cost):

- ``tokens35``: ``target_flops_reduction=0.35``, the default three stages;
- ``tokens35_1stage``: the same FLOPs budget with one stage (``num_stages=1``);
- ``latency30``: ``target_latency_reduction=0.3`` at batch 1 (the latency table timed on this machine, each
  stage's own time in it, stages placed where they gain): is the measured latency reduction within 10% of
  the 30% asked for?

Every row is timed against the dense model side by side (``hf_vitprune.speed.measure_speed``: batch-1
latency and batch-64 throughput, interleaved, median of ``repeats``), and reported as the latency speedup,
the throughput speedup and each over the FLOPs speedup (``model_stats``, selectors included)::

    python -m benchmarks.token_speed                       # about 10 minutes on 2 idle cores
    python -m benchmarks.token_speed --shapes tokens50 --repeats 3     # a quick look

It writes ``benchmarks/results/token_speed.json`` and prints one line per row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

from hf_vitprune import model_stats
from hf_vitprune.fileio import atomic_directory
from hf_vitprune.methods.spvit_tokens import predicted_latency_ms
from hf_vitprune.speed import hardware_name, measure_speed
from hf_vitprune.tokens import token_pruning_of

from .speed_shapes import COMMON, SHAPES, token_path

RESULTS = Path(__file__).parent / "results" / "token_speed.json"
TOKENS50 = dict(hidden_size=96, num_attention_heads=6, intermediate_size=192, num_hidden_layers=4, image_size=28,
                patch_size=4, num_channels=1, num_labels=10)
MODELS = {"deit_tiny": {**COMMON, **SHAPES["deit_tiny"]}, "deit_small": {**COMMON, **SHAPES["deit_small"]},
          "tokens50": TOKENS50}
ROWS = {
    "tokens35": dict(target_flops_reduction=0.35),
    "tokens35_1stage": dict(target_flops_reduction=0.35, num_stages=1),
    "latency30": dict(target_latency_reduction=0.3),
}


def dense_model(shape: str, seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**MODELS[shape], attn_implementation="sdpa")).eval()


def measure_row(shape: str, row: str, dense, repeats: int) -> dict:
    model, method = token_path(dense, **ROWS[row])
    stats, dense_stats = model_stats(model), model_stats(dense)
    speed = measure_speed(model, dense, repeats=repeats, warmup=2)
    flops_speedup = dense_stats.flops / stats.flops
    record = {
        "shape": shape, "row": row, "depths": list(method.stages.depths),
        "keep_ratios": [round(r, 4) for r in method.stages.keep_ratios],
        "tokens_per_layer": [layer.tokens for layer in stats.layers], "flops_ratio": stats.flops / dense_stats.flops,
        "flops_speedup": flops_speedup, "latency_speedup": speed["latency_speedup"],
        "throughput_speedup": speed["throughput_speedup"],
        "latency_over_flops_speedup": speed["latency_speedup"] / flops_speedup,
        "throughput_over_flops_speedup": speed["throughput_speedup"] / flops_speedup, "speed": speed,
    }
    if method.latency_table is not None:
        path = token_pruning_of(model)
        predicted = predicted_latency_ms(method.latency_table, path, stats.layers[0].tokens)
        record.update(predicted_latency_reduction=1 - predicted / method.latency_table["model_ms"],
                      measured_latency_reduction=1 - speed["pruned"]["latency_ms"] / speed["dense"]["latency_ms"],
                      stage_ms=method.latency_table["stages_ms"], table_model_ms=method.latency_table["model_ms"])
    return record


def describe(record: dict) -> str:
    if "refused" in record:
        return f"{record['shape']:10s} {record['row']:16s} refused: {record['refused']}"
    text = (f"{record['shape']:10s} {record['row']:16s} stages {record['depths']} keep {record['keep_ratios']}: "
            f"FLOPs x{record['flops_speedup']:.2f}, batch-1 latency x{record['latency_speedup']:.2f} "
            f"({record['latency_over_flops_speedup']:.2f} of FLOPs), batch-64 throughput "
            f"x{record['throughput_speedup']:.2f} ({record['throughput_over_flops_speedup']:.2f})")
    if "measured_latency_reduction" in record:
        text += (f"; latency reduction measured {record['measured_latency_reduction']:.1%} "
                 f"(predicted {record['predicted_latency_reduction']:.1%}, asked 30%)")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(MODELS),
                        default=["tokens50", "deit_tiny", "deit_small"])
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = []
    for shape in args.shapes:
        dense = dense_model(shape)
        for row in args.rows:
            try:
                record = measure_row(shape, row, dense, args.repeats)
            except ValueError as error:  # a budget this model cannot reach here: the refusal is the finding
                record = {"shape": shape, "row": row, "refused": str(error)}
            print(describe(record), flush=True)
            records.append(record)
    command = " ".join(["python -m benchmarks.token_speed", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, "hardware": hardware_name(),
              "threads": args.threads, "repeats": args.repeats, "records": records}
    with atomic_directory(args.output.parent) as staging:
        (staging / args.output.name).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
