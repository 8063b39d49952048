"""Turn the token benchmark's JSON (``python -m benchmarks.tokens``) into its summary and its page (BENCHMARKS_TOKENS.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .report import _from_scratch_minutes, _mean, _rel, _status, _table, accuracy_figures, measured_by

# The targets of issue 13 (deliverable 6).
TOKENS_TARGET_REDUCTION = 0.35  # "tokens alone at about 35% fewer FLOPs"
MAX_TOKENS_DROP_POINTS = 0.5
MIN_TOKENS_EFFICIENCY = 0.9  # throughput speedup / FLOPs speedup at batch 64
MIN_STACK_THROUGHPUT_RATIO = 1.3  # gohsp + tokens against gohsp alone, measured side by side at batch 64
MAX_STACK_DROP_POINTS = 1.0  # gohsp + tokens against gohsp alone


def _seeds(count: int) -> str:
    return f"{count} seed" + ("" if count == 1 else "s")


def _runs_of(results: dict, row: str) -> list[dict]:
    return sorted((r for r in results["runs"] if r["row"] == row), key=lambda r: r["seed"])


def summarise(results: dict) -> dict:
    """Per row: means and spreads over seeds; then each target, met or missed and by how much."""
    dense_accuracy = results["dense"]["test"]["accuracy"]
    rows = []
    for name in results["settings"]["methods"]:  # the row names, in table order
        runs = _runs_of(results, name)
        if not runs:
            continue
        first = runs[0]
        stages = first.get("token_stages")
        row = {
            "row": name,
            "kind": first["kind"],
            "seeds": [r["seed"] for r in runs],
            "target_flops_reduction": first["target_flops_reduction"],
            **accuracy_figures(runs, dense_accuracy),
            "flops_speedup": _mean([r["flops_speedup"] for r in runs]),
            # the stages' token counts follow from the budget alone, so every seed has the same
            "tokens_per_layer": first["tokens_per_layer"],
            "tokens_per_layer_same_for_every_seed": all(r["tokens_per_layer"] == first["tokens_per_layer"] for r in runs),
            "stage_depths": stages["depths"] if stages else None,
            "keep_ratios": stages["keep_ratios"] if stages else None,
            "keep_counts": stages["keep_counts"] if stages else None,
            "latency_speedup": _mean([r["speed"]["latency_speedup"] for r in runs]),
            "throughput_speedup": _mean([r["speed"]["throughput_speedup"] for r in runs]),
            "throughput_efficiency": _mean([r["throughput_speedup_over_flops_speedup"] for r in runs]),
            "throughput_efficiency_min": min(r["throughput_speedup_over_flops_speedup"] for r in runs),
            "latency_efficiency": _mean([r["latency_speedup_over_flops_speedup"] for r in runs]),
            "train_seconds": _mean([r["train_seconds"] for r in runs]),
        }
        if first["kind"] == "stack":
            row.update(_against_base(results, runs))
        rows.append(row)
    return {"dense_accuracy": dense_accuracy, "rows": rows, "targets": _targets(results, rows, dense_accuracy)}


def _against_base(results: dict, runs: list[dict]) -> dict:
    """The stacked row against its gohsp row: speed side by side, FLOPs, and accuracy paired by seed."""
    base = {r["seed"]: r for r in _runs_of(results, runs[0]["base"]["row"])}
    paired = [(base[r["seed"]]["test_accuracy"], r["test_accuracy"]) for r in runs if r["seed"] in base]
    return {
        "base_row": runs[0]["base"]["row"],
        "flops_ratio_vs_base": _mean([r["flops_ratio_vs_base"] for r in runs]),
        "flops_speedup_vs_base": _mean([r["flops_speedup_vs_base"] for r in runs]),
        "throughput_ratio_vs_base": _mean([r["throughput_ratio_vs_base"] for r in runs]),
        "throughput_ratio_vs_base_min": min(r["throughput_ratio_vs_base"] for r in runs),
        "latency_ratio_vs_base": _mean([r["speed_vs_base"]["latency_speedup"] for r in runs]),
        "throughput_efficiency_vs_base": _mean([r["throughput_efficiency_vs_base"] for r in runs]),
        "paired_seeds": len(paired),
        # base minus stacked, percentage points, mean over the seeds both have
        "drop_vs_base_points": 100 * _mean([b - s for b, s in paired]) if paired else None,
    }


def _row(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["row"] == name), None)


def _token_target_row(rows: list[dict]) -> dict | None:
    """The token-only row at about 35% fewer FLOPs (its budget within 0.05 of it)."""
    tokens = [r for r in rows if r["kind"] == "tokens"
              and abs(r["target_flops_reduction"] - TOKENS_TARGET_REDUCTION) <= 0.05]
    return min(tokens, key=lambda r: abs(r["target_flops_reduction"] - TOKENS_TARGET_REDUCTION), default=None)


def _not_run(target: dict, why: str) -> dict:
    return {**target, "measured": f"not run: {why}", "met": None, "miss_by": "", "detail": {}}


def _targets(results: dict, rows: list[dict], dense_accuracy: float) -> list[dict]:
    targets = []
    tokens = _token_target_row(rows)
    label = f"Tokens alone at about {TOKENS_TARGET_REDUCTION:.0%} fewer FLOPs ({tokens['row'] if tokens else 'none'})"
    accuracy = {"id": "tokens_accuracy", "target": f"{label}: accuracy within {MAX_TOKENS_DROP_POINTS} points of dense"}
    speed = {"id": "tokens_efficiency",
             "target": f"{label}: throughput / FLOPs at batch 64 >= {MIN_TOKENS_EFFICIENCY}"}
    if tokens is None:
        targets += [_not_run(accuracy, "no token-only row at about 35%"), _not_run(speed, "no token-only row")]
    else:
        seeds = len(tokens["seeds"])
        targets.append({
            **accuracy,
            "measured": f"{100 * tokens['accuracy_mean']:.2f}% ± {100 * tokens['accuracy_std']:.2f} vs dense "
                        f"{100 * dense_accuracy:.2f}%: drop {tokens['drop_points']:+.2f} points (mean of "
                        f"{_seeds(seeds)}, {100 * (1 - tokens['flops_ratio']):.1f}% fewer FLOPs)",
            "met": tokens["drop_points"] <= MAX_TOKENS_DROP_POINTS,
            "miss_by": f"{tokens['drop_points'] - MAX_TOKENS_DROP_POINTS:.2f} points",
            "detail": {"row": tokens["row"], "drop_points": tokens["drop_points"]},
        })
        targets.append({
            **speed,
            "measured": f"{tokens['throughput_speedup']:.2f}x measured / {tokens['flops_speedup']:.2f}x FLOPs = "
                        f"{tokens['throughput_efficiency']:.2f} (mean of {_seeds(seeds)}, min "
                        f"{tokens['throughput_efficiency_min']:.2f})",
            "met": tokens["throughput_efficiency"] >= MIN_TOKENS_EFFICIENCY,
            "miss_by": f"{MIN_TOKENS_EFFICIENCY - tokens['throughput_efficiency']:.2f} (x FLOPs speedup)",
            "detail": {"row": tokens["row"], "efficiency": tokens["throughput_efficiency"]},
        })
    stacked = next((r for r in rows if r["kind"] == "stack"), None)
    base = _row(rows, stacked["base_row"]) if stacked else None
    sparsity = results["settings"]["sparsities"][0]
    name = f"gohsp {sparsity:.0%} + tokens"
    throughput = {"id": "stack_throughput",
                  "target": f"{name}: throughput at batch 64 >= {MIN_STACK_THROUGHPUT_RATIO}x that of gohsp "
                            f"{sparsity:.0%} alone"}
    close = {"id": "stack_accuracy",
             "target": f"{name}: accuracy within {MAX_STACK_DROP_POINTS:g} point of gohsp {sparsity:.0%} alone"}
    if stacked is None or base is None or not stacked["paired_seeds"]:
        return targets + [_not_run(throughput, "no stacked row"), _not_run(close, "no stacked row")]
    seeds = len(stacked["seeds"])
    targets.append({
        **throughput,
        "measured": f"{stacked['throughput_ratio_vs_base']:.2f}x (side by side, mean of {_seeds(seeds)}, min "
                    f"{stacked['throughput_ratio_vs_base_min']:.2f}x) at {stacked['flops_speedup_vs_base']:.2f}x "
                    f"fewer FLOPs than {base['row']}: throughput / FLOPs {stacked['throughput_efficiency_vs_base']:.2f}",
        "met": stacked["throughput_ratio_vs_base"] >= MIN_STACK_THROUGHPUT_RATIO,
        "miss_by": f"{MIN_STACK_THROUGHPUT_RATIO - stacked['throughput_ratio_vs_base']:.2f}x",
        "detail": {"row": stacked["row"], "base_row": base["row"]},
    })
    drop = stacked["drop_vs_base_points"]
    targets.append({
        **close,
        "measured": f"{100 * stacked['accuracy_mean']:.2f}% ± {100 * stacked['accuracy_std']:.2f} vs "
                    f"{100 * base['accuracy_mean']:.2f}% ± {100 * base['accuracy_std']:.2f}: drop {drop:+.2f} points "
                    f"(mean over {_seeds(stacked['paired_seeds'])}, paired by seed)",
        "met": drop <= MAX_STACK_DROP_POINTS,
        "miss_by": f"{drop - MAX_STACK_DROP_POINTS:.2f} points",
        "detail": {"row": stacked["row"], "base_row": base["row"], "drop_points": drop},
    })
    return targets


# --------------------------------------------------------------------------- why a target is missed


def _spaced(values) -> str:
    return " ".join(map(str, values))


def _stages_sentence(row: dict, results: dict) -> str:
    if not row.get("keep_counts"):
        return ""
    patches = results["dense"]["patches"]
    stages = ", ".join(f"{count} of {patches} before layer {depth}"
                       for depth, count in zip(row["stage_depths"], row["keep_counts"]))
    return (f"Its stages keep {stages} patch tokens (one package token added per stage), so the layers see "
            f"{_spaced(row['tokens_per_layer'])} of {results['dense']['tokens']} tokens.")


def _untouched_share(results: dict, row: dict) -> float | None:
    """Share of the row's FLOPs (seed 0's model) in the layers before its first stage, which keep every token."""
    run = _runs_of(results, row["row"])[0]
    per_layer = run.get("flops_per_layer")
    if not per_layer or not row.get("stage_depths"):
        return None
    return sum(per_layer[: row["stage_depths"][0]]) / run["flops"]


def _sampling_error_points(accuracy: float, count: int) -> float:
    return 100 * math.sqrt(accuracy * (1 - accuracy) / count)


def _why_tokens_accuracy(target: dict, results: dict, rows: list[dict]) -> str:
    row = _row(rows, target["detail"]["row"])
    settings = results["settings"]
    per_seed = ", ".join(f"seed {r['seed']} {100 * r['test_accuracy']:.2f}%" for r in _runs_of(results, row["row"]))
    test_count = results["dense"]["split_sizes"]["test"]
    error = _sampling_error_points(row["accuracy_mean"], test_count)
    spread = 100 * row["accuracy_std"]
    error_text = f"the sampling error of one accuracy on the test split ({error:.2f} points at this accuracy, {test_count:,} images)"
    scale = (f"the larger of {error_text} and the spread between seeds ({spread:.2f} points)" if len(row["seeds"]) > 1
             else f"{error_text}; one seed, so no spread between seeds to weigh")
    noise = (f"The drop is within twice {scale}: this run cannot tell it from noise"
             if row["drop_points"] <= 2 * max(error, spread) else f"The drop is more than twice {scale}")
    validation_drop = 100 * (results["dense"]["validation"]["accuracy"] - row["validation_accuracy_mean"])
    others = ", ".join(f"{r['row']} {r['drop_points']:+.2f}" for r in rows if r["kind"] == "tokens" and r is not row)
    return (
        f"Per seed: {per_seed}; the validation drop is {validation_drop:+.2f} points. {noise}. "
        f"{_stages_sentence(row, results)} Each run trains {settings['prune_epochs']:g} epochs "
        f"({settings.get('search_fraction', settings['admm_fraction']):.0%} of the steps selecting with sampled decisions and the keep-rate loss, the "
        f"rest fine-tuning on the inference decisions) against {settings['dense_epochs']:g} for the dense model"
        + (f"; drops of the other token rows (points): {others}" if others else "")
        + ". What would narrow it (not measured here): more fine-tuning epochs, or the first stage later in the depth "
        "(it drops the most tokens earliest)."
    )


def _why_tokens_speed(target: dict, results: dict, rows: list[dict]) -> str:
    row = _row(rows, target["detail"]["row"])
    untouched = _untouched_share(results, row)
    first = (f" The layers before the first stage see every token: {untouched:.0%} of the row's FLOPs, which the stages "
             "cannot shrink." if untouched is not None else "")
    others = ", ".join(f"{r['row']} {r['throughput_efficiency']:.2f}" for r in rows if r is not row)
    model = results["settings"]["model"]
    return (
        f"At batch 1 the latency speedup is {row['latency_speedup']:.2f}x (latency / FLOPs "
        f"{row['latency_efficiency']:.2f}); throughput / FLOPs of the other rows: {others}.{first} The FLOPs count the "
        "matrix products (the selectors' included); every stage also runs work the count leaves out and that does not "
        "shrink with the tokens: the selector's LayerNorm, GELU and softmax, a top-k, a sort, two gathers, the package "
        "token's weighted mean and a concatenation, each a separate operator whose fixed cost weighs more the smaller "
        f"the model ({model['hidden_size']} wide, {results['dense']['tokens']} tokens here). What would close it: "
        "fusing a stage's bookkeeping (torch.compile), fewer stages, larger models or batches where the matrix "
        "products dominate."
    )


def _why_stack_speed(target: dict, results: dict, rows: list[dict]) -> str:
    row = _row(rows, target["detail"]["row"])
    base = _row(rows, target["detail"]["base_row"])
    efficiency = row["throughput_efficiency_vs_base"]
    needed = MIN_STACK_THROUGHPUT_RATIO / efficiency if efficiency > 0 else float("inf")
    per_seed = ", ".join(f"seed {r['seed']} {r['throughput_ratio_vs_base']:.2f}x" for r in _runs_of(results, row["row"]))
    reduction = 1 - 1 / needed if math.isfinite(needed) else None
    untouched = _untouched_share(results, row)
    first = (f" The layers before the first stage keep every token: {untouched:.0%} of the stacked model's FLOPs."
             if untouched is not None else "")
    return (
        f"Per seed: {per_seed}. The token stages removed {100 * (1 - row['flops_ratio_vs_base']):.1f}% of "
        f"{base['row']}'s FLOPs (budget {row['target_flops_reduction']:.0%}), a {row['flops_speedup_vs_base']:.2f}x "
        f"FLOPs speedup, measured as {row['throughput_ratio_vs_base']:.2f}x: throughput / FLOPs {efficiency:.2f} "
        f"({base['row']} against the dense model: {base['throughput_efficiency']:.2f}). {_stages_sentence(row, results)}"
        f"{first} At that efficiency, {MIN_STACK_THROUGHPUT_RATIO}x needs {needed:.2f}x fewer FLOPs"
        + (f", a token budget removing about {reduction:.0%} of {base['row']}'s FLOPs if the efficiency held (not "
           "measured here)" if reduction else "")
        + ". Each stage's bookkeeping (selector, top-k, gathers, package token) is fixed per-operator work that weighs "
        f"more on the narrower {base['row']} model than on the dense one."
    )


def _why_stack_accuracy(target: dict, results: dict, rows: list[dict]) -> str:
    row = _row(rows, target["detail"]["row"])
    base = _row(rows, target["detail"]["base_row"])
    bases = {r["seed"]: r for r in _runs_of(results, base["row"])}
    per_seed = ", ".join(f"seed {r['seed']} {100 * bases[r['seed']]['test_accuracy']:.2f}% -> "
                         f"{100 * r['test_accuracy']:.2f}%" for r in _runs_of(results, row["row"]) if r["seed"] in bases)
    tokens = _token_target_row(rows)
    drop = row["drop_vs_base_points"]
    alone = ""
    if tokens:
        alone = (f" Token pruning alone at {tokens['target_flops_reduction']:.0%} fewer FLOPs costs the dense model "
                 f"{tokens['drop_points']:+.2f} points; removing {row['target_flops_reduction']:.0%} of {base['row']}'s "
                 f"FLOPs costs {base['row']} {drop:+.2f}")
        alone += (": more on the pruned model, which has less to spare." if drop > tokens["drop_points"] + 0.1 else
                  ": about as much or less, so the miss is mostly what dropping that share of tokens costs at this "
                  "budget of epochs.")
    spread = 100 * max(row["accuracy_std"], base["accuracy_std"])
    noise = (f" The spread between seeds is up to {spread:.2f} points." if len(row["seeds"]) > 1 else "")
    settings = results["settings"]
    return (
        f"Per seed ({base['row']} -> stacked): {per_seed}.{alone}{noise} The stacked run distils from its {base['row']} model (the trainer's teacher is the model "
        f"it is given) and trains {settings['prune_epochs']:g} epochs on top of {base['row']}'s "
        f"{settings['prune_epochs']:g}. What would narrow it (not measured here): a smaller token budget on the "
        "pruned model, more epochs, or distilling from the dense model."
    )


WHY = {
    "tokens_accuracy": _why_tokens_accuracy,
    "tokens_efficiency": _why_tokens_speed,
    "stack_throughput": _why_stack_speed,
    "stack_accuracy": _why_stack_accuracy,
}


# --------------------------------------------------------------------------- the page


def _dense_epochs_note(results: dict, path: Path) -> str:
    settings, training = results["settings"], results["dense"]["training"]
    if settings["dataset"] != "fashion_mnist":
        return " The quick mode checks the pipeline, not the targets."
    per_epoch = training["train_seconds"] / settings["dense_epochs"]
    processes = training.get("processes", 1)
    main = _main_benchmark_dense(settings)
    compared = ""
    if main is not None and main.get("processes", 1) == processes:
        main_per_epoch = main["train_seconds"] / main["epochs"]
        compared = (f", {per_epoch / main_per_epoch:.1f}x the {main_per_epoch:.0f} s of the {main['tokens']}-token "
                    "model")
    return (
        f" Why {settings['dense_epochs']:g} epochs and not the 60 of the 17-token model in "
        f"[BENCHMARKS.md]({_rel(Path('BENCHMARKS.md'), path)}): with {results['dense']['tokens']} tokens an epoch took "
        f"{per_epoch:.0f} s here on {processes} process{'' if processes == 1 else 'es'}{compared}, so 60 epochs would "
        f"take about {per_epoch:.0f} minutes of the 2 cores. Every row is read against this dense model (the stacked one also against its gohsp model): "
        "the drops are the figures, not the dense model's level."
    )


MAIN_RESULTS = "fashion_mnist.json"  # written by `python -m benchmarks.run`, beside this benchmark's JSON


def _main_benchmark_dense(settings: dict) -> dict | None:
    """The main benchmark's dense training (seconds, epochs, processes, tokens), when its JSON is beside ours."""
    path = Path(settings["output_dir"]) / MAIN_RESULTS
    if not path.is_file():
        return None
    main = json.loads(path.read_text())
    model, training = main["settings"]["model"], main["dense"]["training"]
    return {"train_seconds": training["train_seconds"], "epochs": main["settings"]["dense_epochs"],
            "processes": training.get("processes", 1),
            "tokens": (model["image_size"] // model["patch_size"]) ** 2 + 1}


def _runtime(results: dict) -> str:
    minutes = results.get("total_seconds", 0) / 60
    training = results["dense"]["training"]
    if training.get("reused_from_cache"):
        return (f"{minutes:.1f} minutes, reusing the cached dense model, whose training took "
                f"{training['train_seconds'] / 60:.1f} minutes: {_from_scratch_minutes(results):.1f} minutes from scratch")
    return f"{minutes:.1f} minutes in all, dense training included"


def write_markdown(results: dict, path: Path) -> None:
    settings, dense, summary, env = results["settings"], results["dense"], results["summary"], results["environment"]
    rows = summary["rows"]
    model = settings["model"]
    dense_acc = dense["test"]["accuracy"]
    fashion = settings["dataset"] == "fashion_mnist"
    data_name = "Fashion-MNIST" if fashion else "scikit-learn digits"
    json_path = Path(settings["output_dir"]) / f"{settings['results_name']}.json"
    sparsity = settings["sparsities"][0]
    gohsp, stacked = f"gohsp{round(100 * sparsity)}", f"gohsp{round(100 * sparsity)}+tokens"
    token_rows = [f"tokens{round(100 * r)}" for r in settings["token_reductions"]]
    same = next((name for name, r in zip(token_rows, settings["token_reductions"])
                 if abs(r - settings["stack_flops_reduction"]) < 1e-9), None)
    epochs = settings["prune_epochs"]
    out = [
        "# Token pruning benchmark",
        "",
        f"Token pruning (`spvit_tokens`, SPViT soft token pruning; [docs/methods.md]({_rel(Path('docs/methods.md'), path)}"
        "#spvit_tokens)) alone "
        f"and stacked on gohsp's head and neuron pruning, on "
        + (f"a token-rich variant of the benchmark model ({data_name}, {dense['tokens']} tokens)." if fashion else
           f"the quick benchmark's model ({data_name}, {dense['tokens']} tokens; a smoke run of the pipeline).")
        + " " + measured_by(results, _runtime(results), _rel(json_path, path)),
        "",
        "## How to run it",
        "",
        "```bash",
        "apt-get update && apt-get install -y dataset-fashion-mnist   # the data, in /usr/share/datasets/fashion-mnist",
        'pip install -e ".[bench]"',
        "python -m benchmarks.tokens                # full run"
        + (f", ~{_from_scratch_minutes(results):.0f} min" if fashion else "")
        + " on 2 CPU cores; the dense ViT is cached in outputs/benchmark-dense-fashion-mnist-tokens",
        "python -m benchmarks.tokens --quick        # smoke run on scikit-learn's digits, writes outputs/benchmarks-tokens-quick/",
        "python -m benchmarks.tokens --report_only  # rebuild this page from the JSON",
        "python -m benchmarks.tokens --resume       # continue an interrupted run, keeping its finished runs",
        "```",
        "",
        "## Setup",
        "",
        f"- **Data**: {data_name}; train {dense['split_sizes']['train']:,} images, validation "
        f"{dense['split_sizes']['validation']:,} (carved from the training images), test "
        f"{dense['split_sizes']['test']:,} (every accuracy below).",
        f"- **Dense model**: {'the benchmark' if fashion else 'the quick benchmark'}'s ViT ({model['num_hidden_layers']} layers, hidden {model['hidden_size']}, "
        f"{model['num_attention_heads']} heads of {model['hidden_size'] // model['num_attention_heads']}, MLP "
        f"{model['intermediate_size']}) in {model['patch_size']}x{model['patch_size']} patches of "
        f"{model['image_size']}x{model['image_size']} images: {dense['patches']} patches + CLS = {dense['tokens']} "
        f"tokens" + (" (the main benchmark's model sees 7x7 patches, 17 tokens), enough for dropping tokens to matter"
                     if fashion else "") + f"; {dense['params']:,} parameters, {dense['flops'] / 1e6:.2f} "
        f"MFLOPs per image. Trained {settings['dense_epochs']:g} epochs, AdamW lr {settings['dense_learning_rate']:g}, "
        f"weight decay {settings['weight_decay']:g}, cosine schedule, batch {settings['batch_size']}"
        + (", random horizontal flips and shifts of up to 2 pixels" if settings.get("augment") else "")
        + (f", {settings['dense_processes']} processes (torchrun, DDP over gloo, one thread each)"
           if settings.get("dense_processes", 1) > 1 else "")
        + f": validation {100 * dense['validation']['accuracy']:.2f}%, **test {100 * dense_acc:.2f}%**. Training took "
        f"{dense['training']['train_seconds'] / 60:.1f} min; this run "
        f"{'reused the cached model' if dense['training'].get('reused_from_cache') else 'trained it'}."
        + _dense_epochs_note(results, path),
        f"- **Rows**, seeds {settings['seeds']}, each run {epochs:g} epochs, AdamW lr {settings['prune_learning_rate']:g}, "
        f"batch {settings['batch_size']}, cosine per phase, distillation weight {settings['distillation_weight']:g} "
        f"(as in `python -m benchmarks.run{'' if fashion else ' --quick'}`): "
        + "; ".join(f"**{name}**: `PruningConfig(method=\"spvit_tokens\", target_flops_reduction={r:g})` on the dense "
                    "model" for name, r in zip(token_rows, settings["token_reductions"]))
        + f"; **{gohsp}**: `PruningConfig(method=\"gohsp\", target_sparsity={sparsity:g})` with the main benchmark's "
        f"gohsp options ({settings['admm_fraction']:.0%} ADMM, Z/U update every {settings['admm_update_steps']} steps, "
        f"ranking on {settings['calibration_samples']} images); **{stacked}**: the saved {gohsp} model of the same seed "
        f"(`from_pretrained`), pruned again by `spvit_tokens` with `target_flops_reduction="
        f"{settings['stack_flops_reduction']:g}` of *that model's* FLOPs (the budget counts from the model the trainer "
        f"is given)" + (f", the share {same} removes from the dense model" if same else "") + "; "
        f"{epochs:g} epochs on top of {gohsp}'s {epochs:g}, **{2 * epochs:g} in all**, distilling from the {gohsp} "
        "model (the trainer's teacher is the model it is given). `spvit_tokens`: selectors before layers "
        "spread over the depth, keep ratios rho, rho^2, rho^3 with the largest rho whose FLOPs (selectors included) "
        f"meet the budget, trained with sampled decisions for the first {settings.get('search_fraction', settings['admm_fraction']):.0%} of the steps, "
        "then fine-tuning on the inference decisions (top-k per stage); every other option at its default.",
        f"- **Speed**: `hf_vitprune.speed.measure_speed`, each run against the dense model in one call (interleaved, "
        f"eval mode, no_grad, median of {settings['speed_repeats']} repeats after 2 warm-ups, "
        f"`torch.set_num_threads({settings['speed_threads']})`), latency at batch 1, throughput at batch 64; "
        f"{stacked} also against its own {gohsp} model in one more call. A token-pruned model in eval mode drops the "
        "tokens for real. FLOPs speedup = dense FLOPs / pruned FLOPs; throughput / FLOPs = measured throughput speedup / "
        f"FLOPs speedup. Load average {', '.join(f'{x:.1f}' for x in env['load_average_at_start'])} at the start; "
        "interleaving makes both models see the same load.",
        "",
        "## Results",
        "",
        f"Test accuracy is the mean ± standard deviation over {_seeds(len(settings['seeds']))}; Δ is in points against "
        "the dense model; speedups are means over seeds, against the dense model. Tokens per layer: what each encoder "
        "layer sees (CLS + kept patches + one package token per stage so far); keep: patch tokens kept by the stage "
        "before layer Ln (a stage that keeps as many as it gets drops nothing).",
        "",
    ]
    header = ["row", "test acc. (%)", "Δ (pt)", "val. acc. (%)", "params", "MFLOPs", "FLOPs kept", "tokens per layer",
              "patches kept (before layer)", "latency b1", "throughput b64", "FLOPs speedup", "throughput / FLOPs"]
    table = [["dense", f"{100 * dense_acc:.2f}", "", f"{100 * dense['validation']['accuracy']:.2f}",
              f"{dense['params']:,}", f"{dense['flops'] / 1e6:.2f}", "100.0%",
              _spaced([dense["tokens"]] * model["num_hidden_layers"]), "", "1.00x", "1.00x", "1.00x", ""]]
    for r in rows:
        keep = ("" if not r["keep_counts"] else
                ", ".join(f"L{d}: {c}" for d, c in zip(r["stage_depths"], r["keep_counts"])))
        table.append([r["row"], f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}",
                      f"{-r['drop_points']:+.2f}", f"{100 * r['validation_accuracy_mean']:.2f}", f"{r['params']:,.0f}",
                      f"{r['flops'] / 1e6:.2f}", f"{100 * r['flops_ratio']:.1f}%", _spaced(r["tokens_per_layer"]), keep,
                      f"{r['latency_speedup']:.2f}x", f"{r['throughput_speedup']:.2f}x", f"{r['flops_speedup']:.2f}x",
                      f"{r['throughput_efficiency']:.2f}"])
    out += [_table(header, table), ""]
    stack_row = next((r for r in rows if r["kind"] == "stack"), None)
    if stack_row:
        out += [f"**{stack_row['row']} against {stack_row['base_row']}**, the two models side by side in one "
                "`measure_speed` call per seed:", "",
                _table(["seed", f"FLOPs kept of {stack_row['base_row']}'s", "latency ms b1 (stacked / base)",
                        "images/s b64 (stacked / base)", "throughput ratio", "throughput / FLOPs",
                        "test acc. (%) (stacked / base)"],
                       [[str(r["seed"]), f"{100 * r['flops_ratio_vs_base']:.1f}%",
                         f"{r['speed_vs_base']['pruned']['latency_ms']:.2f} / {r['speed_vs_base']['dense']['latency_ms']:.2f}",
                         f"{r['speed_vs_base']['pruned']['throughput']:.0f} / {r['speed_vs_base']['dense']['throughput']:.0f}",
                         f"{r['throughput_ratio_vs_base']:.2f}x", f"{r['throughput_efficiency_vs_base']:.2f}",
                         f"{100 * r['test_accuracy']:.2f} / " + _base_accuracy(results, r)]
                        for r in _runs_of(results, stack_row["row"])]), ""]
    out += ["## Targets", ""]
    out += [_table(["target", "measured", "status"],
                   [[t["target"], t["measured"], _status(t)] for t in summary["targets"]]), ""]
    missed = [t for t in summary["targets"] if t["met"] is False]
    if missed:
        out += ["### Where a target is missed", ""]
        for t in missed:
            out += [f"- **{t['target']}**: {t['measured']}, missed by {t['miss_by']}. {WHY[t['id']](t, results, rows)}", ""]
    out += [
        "## Every run",
        "",
        _table(["row", "seed", "test acc. (%)", "val. acc. (%)", "params", "MFLOPs", "tokens per layer",
                "heads per layer", "MLP neurons per layer", "latency ms b1 (pruned / dense)",
                "images/s b64 (pruned / dense)", "train() s"],
               [[r["row"], str(r["seed"]), f"{100 * r['test_accuracy']:.2f}", f"{100 * r['validation_accuracy']:.2f}",
                 f"{r['params']:,}", f"{r['flops'] / 1e6:.2f}", _spaced(r["tokens_per_layer"]),
                 _spaced(r["heads_per_layer"]), _spaced(r["neurons_per_layer"]),
                 f"{r['speed']['pruned']['latency_ms']:.2f} / {r['speed']['dense']['latency_ms']:.2f}",
                 f"{r['speed']['pruned']['throughput']:.0f} / {r['speed']['dense']['throughput']:.0f}",
                 f"{r['train_seconds']:.0f}"]
                for name in settings["methods"] for r in _runs_of(results, name)]),
        "",
    ]
    curve = dense["training"].get("validation_curve") or []
    if curve:
        out += ["## The dense model's validation curve", "",
                "Validation accuracy by epoch: "
                + ", ".join(f"{c['epoch']:g}: {100 * c['validation_accuracy']:.1f}%" for c in curve) + ".", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out).rstrip() + "\n")


def _base_accuracy(results: dict, run: dict) -> str:
    base = next((r for r in _runs_of(results, run["base"]["row"]) if r["seed"] == run["seed"]), None)
    return "" if base is None else f"{100 * base['test_accuracy']:.2f}"
