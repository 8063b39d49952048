"""Side checks behind the explanations in BENCHMARKS.md ("Where a target is missed"), each a command.

Variations of the pruning recipe, scored on the validation split (never the test split)::

    python -m benchmarks.checks recipe --method gohsp --sparsity 0.4 --seed 0 --set admm_update_steps=1000
    python -m benchmarks.checks recipe --method gohsp --sparsity 0.4 --seed 0 --set admm_rho_final=1.0

``--set`` overrides any field of the Fashion-MNIST preset (``benchmarks.common.Settings``); overriding
a dense-model field (``dense_epochs=20 augment=false``) needs another ``cache_dir=...`` and trains that
dense model first.

Whether rounding the MLP widths to multiples of 16 brings the measured speedup closer to the FLOPs
ratio (the widths gohsp kept in the benchmark, seed 0, against the same rounded; weights do not
change the timing)::

    python -m benchmarks.checks widths     # also writes benchmarks/results/width_rounding.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
import transformers

from hf_vitprune import PruningPlan, model_stats
from hf_vitprune.fileio import atomic_directory
from hf_vitprune.speed import measure_speed
from hf_vitprune.surgery import apply_plan

from .common import FASHION_MNIST, Settings, load_data, load_dense, train_or_reuse_dense
from .run import prune_once


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or key not in Settings.__dataclass_fields__:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected FIELD=VALUE with FIELD one of Settings' fields.")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def check_recipe(method: str, sparsity: float, seed: int, overrides: dict) -> dict:
    settings = Settings(**dict(FASHION_MNIST, **overrides))
    torch.set_num_threads(settings.threads)
    data = load_data(settings)
    train_or_reuse_dense(settings, data)
    with tempfile.TemporaryDirectory() as tmp:
        record = prune_once(settings, data, method, sparsity, seed, tmp)
    return {"method": method, "sparsity": sparsity, "seed": seed, "overrides": overrides,
            "validation_accuracy": record["validation_accuracy"],
            "admm_residual_last_logged": record["admm_residual_last_logged"]}


def rounded(widths: list[int], multiple: int = 16) -> list[int]:
    return [max(multiple, multiple * round(width / multiple)) for width in widths]


def check_widths(results_path: Path, repeats: int = 9) -> dict:
    results = json.loads(results_path.read_text())
    settings = Settings(**results["settings"])
    torch.set_num_threads(settings.speed_threads)
    dense = load_dense(settings).eval()
    dense_flops = model_stats(dense).flops
    rows = []
    for run in results["runs"]:
        if run["method"] != "gohsp" or run["seed"] != settings.seeds[0]:
            continue
        for name, widths in (("as kept", run["neurons_per_layer"]), ("rounded to 16", rounded(run["neurons_per_layer"]))):
            plan = PruningPlan(heads={i: list(range(h)) for i, h in enumerate(run["heads_per_layer"])},
                               neurons={i: list(range(n)) for i, n in enumerate(widths)})
            model = apply_plan(copy.deepcopy(dense), plan)
            flops_speedup = dense_flops / model_stats(model).flops
            speed = measure_speed(model, dense, repeats=repeats)
            rows.append({"sparsity": run["sparsity"], "widths": name, "neurons_per_layer": widths,
                         "flops_speedup": flops_speedup, "throughput_speedup": speed["throughput_speedup"],
                         "efficiency": speed["throughput_speedup"] / flops_speedup})
            print(json.dumps(rows[-1]), flush=True)
    return {"repeats": repeats, "torch_threads": settings.speed_threads, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    recipe = commands.add_parser("recipe", help="One pruning run with changed settings; prints its validation accuracy.")
    recipe.add_argument("--method", default="gohsp")
    recipe.add_argument("--sparsity", type=float, default=0.4)
    recipe.add_argument("--seed", type=int, default=0)
    recipe.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="FIELD=VALUE")
    widths = commands.add_parser("widths", help="Speed of the kept MLP widths against the same rounded to 16.")
    widths.add_argument("--results", type=Path, default=Path(FASHION_MNIST["output_dir"]) / "fashion_mnist.json")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_warning()
    if args.command == "recipe":
        print(json.dumps(check_recipe(args.method, args.sparsity, args.seed, dict(args.overrides))))
    else:
        report = check_widths(args.results)
        with atomic_directory(args.results.parent) as staging:
            (staging / "width_rounding.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.results.parent / 'width_rounding.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
