"""The ``hf-vitprune`` command line: ``report MODEL``, ``card MODEL_DIR``, ``export MODEL_DIR`` and ``prune ...``.

    hf-vitprune report out/deit-small-pruned-35       # per-layer table, totals, measured speed, ratios
    hf-vitprune card out/deit-small-pruned-35         # re-render README.md from pruning_report.json
    hf-vitprune export out/deit-small-pruned-35       # ONNX (dynamic batch), checked in ONNX Runtime
    hf-vitprune prune --config recipe.yaml            # run a pruning recipe (hf_vitprune.recipe)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

PROG = "hf-vitprune"


class CommandError(Exception):
    """A user error: printed as ``hf-vitprune <command>: error: <message>``, exit status 1."""


# --------------------------------------------------------------------------- parsing


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Structured pruning of Hugging Face vision transformers.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    report = commands.add_parser(
        "report",
        help="parameters, FLOPs and measured speed of a saved model, and the ratios against its dense base",
        description="Print per-layer and total parameters and FLOPs of a saved (pruned or dense) model, its "
        "measured latency at batch 1 and throughput at a larger batch on this machine, and, for a pruned "
        "model, the ratios against the dense architecture it was pruned from.",
    )
    report.add_argument("model", metavar="MODEL", help="a model directory (save_pretrained output) or a Hub repo id")
    report.add_argument("--batch-size", type=_positive_int, default=64, help="batch size of the throughput run (64)")
    report.add_argument("--repeats", type=_positive_int, default=5, help="timed runs; the median is reported (5)")
    report.add_argument("--warmup", type=_non_negative_int, default=2, help="untimed runs before timing (2)")
    report.add_argument(
        "--device", default=None, help="device to time on, e.g. cpu or cuda:0 (default: cuda if available)"
    )
    report.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    report.add_argument("--no-speed", action="store_true", help="skip the timing runs")
    report.add_argument("--onnx", action="store_true", help="also time the model and its dense architecture in "
                        "ONNX Runtime (CPU), both exported first; needs the onnx extra")

    card = commands.add_parser(
        "card",
        help="re-render README.md of a pruned model directory from its pruning_report.json",
        description="Re-render the model card (README.md) of a model directory from its pruning_report.json.",
    )
    card.add_argument("model_dir", metavar="MODEL_DIR", help="directory written by PruningTrainer.save_model()")
    card.add_argument("--repo-id", default=None, help="Hub repo id to show in the card's loading examples")

    export = commands.add_parser(
        "export",
        help="export a pruned model directory to ONNX and check it in ONNX Runtime",
        description="Export a pruned model (save_pretrained output) to ONNX with a dynamic batch dimension "
        "(torch.onnx, dynamo exporter), then run it in ONNX Runtime at batch sizes 1 and 7 and compare with "
        "PyTorch. Needs the onnx extra: pip install \"hf_vitprune[onnx]\".",
    )
    export.add_argument("model_dir", metavar="MODEL_DIR", help="directory of a model pruned by hf_vitprune")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="the export format (onnx)")
    export.add_argument("--output", default=None, help="the file to write (default: MODEL_DIR/model.onnx); never "
                        "a file of the model")
    export.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    export.add_argument("--opset", type=_positive_int, default=18,
                        help="ONNX opset, 18 up to the newest the installed exporter writes (18)")

    commands.add_parser(
        "prune",
        add_help=False,  # `hf-vitprune prune --help` is the recipe's help
        help="run a pruning recipe; the arguments go to hf_vitprune.recipe (see `hf-vitprune prune --help`)",
        usage=f"{PROG} prune [options]",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hf-vitprune``; returns the exit status (0 ok, 1 failed, 2 bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command != "prune" and rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(exit_.code or 0)
    try:
        if args.command == "report":
            return command_report(args)
        if args.command == "card":
            return command_card(args)
        if args.command == "export":
            return command_export(args)
        return command_prune(rest)
    except CommandError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- prune


def command_prune(argv: list[str]) -> int:
    """Forward ``argv`` untouched to ``hf_vitprune.recipe.main`` (imported only now: it pulls in datasets)."""
    import importlib
    import importlib.util

    if "hf_vitprune.recipe" not in sys.modules and importlib.util.find_spec("hf_vitprune.recipe") is None:
        raise CommandError("this installation of hf_vitprune has no recipe module (hf_vitprune.recipe); reinstall it.")
    recipe = importlib.import_module("hf_vitprune.recipe")
    return int(recipe.main(argv, prog=f"{PROG} prune") or 0)


# --------------------------------------------------------------------------- export


def command_export(args) -> int:
    from .export import export_onnx

    directory = Path(args.model_dir)
    if not directory.is_dir():
        raise CommandError(f"{directory} is not a directory. Pass the directory a pruned model was saved in.")
    output = Path(args.output) if args.output else directory / "model.onnx"
    try:
        result = export_onnx(directory, output, opset=args.opset, overwrite=args.overwrite)
    except (ValueError, ImportError, RuntimeError, OSError) as error:  # OSError: an output refused or unwritable
        raise CommandError(str(error)) from None
    for path in result.removed_stale:
        print(f"Removed {path}, left by an export to {result.path} that was interrupted.")
    differences = ", ".join(f"batch {size}: {diff:.2g}" for size, diff in result.max_abs_diff.items())
    print(f"Wrote {result.path} (opset {result.opset}, dynamic batch); ONNX Runtime vs PyTorch, max abs "
          f"difference: {differences}.")
    return 0


# --------------------------------------------------------------------------- card


def command_card(args) -> int:
    from .reporting import CARD_FILE, REPORT_FILE, rerender_model_card

    directory = Path(args.model_dir)
    if not directory.exists():
        raise CommandError(f"{directory} does not exist. Pass the directory written by PruningTrainer.save_model().")
    if not directory.is_dir():
        raise CommandError(f"{directory} is not a directory. Pass the model directory, not a file in it.")
    if not (directory / REPORT_FILE).is_file():
        raise CommandError(
            f"{directory} has no {REPORT_FILE}, so there is nothing to render the card from. "
            f"PruningTrainer.save_model() writes it; for a model pruned by hand, write one with "
            f"hf_vitprune.reporting.write_model_card(dir, "
            f"PruningReport.from_models(dense, pruned, pruning_config=...))."
        )
    if (directory / "config.json").is_file():  # a report copied from another run must not describe this model
        import torch
        from transformers import AutoConfig

        import hf_vitprune  # noqa: F401  (registers the pruned architectures)

        from .modeling import auto_class_for
        from .reporting import PruningReport, model_mismatch
        from .stats import model_stats

        try:
            report = PruningReport.from_pretrained(directory)
        except (ValueError, TypeError, KeyError) as error:
            raise CommandError(f"{directory / REPORT_FILE} is not a valid pruning report: {error}") from None
        try:
            config = AutoConfig.from_pretrained(directory)
            with torch.device("meta"):  # the architecture only: no weights are read
                model = auto_class_for(config).from_config(config)
            stats = model_stats(model)
        except (OSError, ValueError, KeyError) as error:
            raise CommandError(f"could not read the model in {directory} (config.json): {error}") from None
        mismatch = model_mismatch(report, stats, getattr(config, "num_labels", None) if report.is_classifier else None)
        if mismatch:
            raise CommandError(
                f"{directory / REPORT_FILE} does not describe the model in {directory}: {mismatch}. It belongs to "
                f"another model; the card was left as it was. Copy the report saved with this model (PruningTrainer."
                f"save_model() writes both), or remove it.")
    try:
        card = rerender_model_card(directory, repo_id=args.repo_id)
    except (ValueError, TypeError, KeyError) as error:
        raise CommandError(f"{directory / REPORT_FILE} is not a valid pruning report: {error}") from None
    except OSError as error:  # a read-only file system, no permission, a full disk
        reason = error.strerror or str(error)
        raise CommandError(f"cannot write the card into {directory}: {reason}. Make the directory writable, or "
                           f"copy it somewhere writable and run `{PROG} card` there.") from None
    print(f"Wrote {directory / CARD_FILE} ({len(str(card).splitlines())} lines) from {directory / REPORT_FILE}.")
    return 0


# --------------------------------------------------------------------------- report


def _looks_like_repo_id(text: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not text.startswith(".")


def load_model(name_or_path: str):
    """Load a saved model with the Auto classes (after registering the pruned architectures)."""
    import hf_vitprune  # noqa: F401  (registers the pruned architectures)
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from .modeling import auto_class_for

    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise CommandError(f"{path} is a file; pass the model directory that holds config.json.")
        if not (path / "config.json").is_file():
            raise CommandError(
                f"{path} has no config.json, so it is not a saved model directory. Pass the directory written by "
                f"save_pretrained() or PruningTrainer.save_model()."
            )
    elif not _looks_like_repo_id(name_or_path):
        raise CommandError(f"{path} does not exist. Pass a saved model directory or a Hub repo id (org/name).")
    hf_logging.disable_progress_bar()
    try:
        return auto_class_for(AutoConfig.from_pretrained(name_or_path)).from_pretrained(name_or_path)
    except Exception as error:  # OSError (not found / offline), ValueError (bad config or weights)
        lines = str(error).strip().splitlines() or [type(error).__name__]
        if path.exists():
            raise CommandError(f"could not load {name_or_path} from the directory: {lines[0]}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        reason = "HF_HUB_OFFLINE is set and it is not in the Hub cache" if offline else lines[0]
        raise CommandError(f"{name_or_path} is neither a local directory nor reachable on the Hub ({reason}). Pass a "
                           f"saved model directory, or a Hub repo id with the network on and HF_HUB_OFFLINE unset.") \
            from None


def _check_device(name: str) -> None:
    """--device must name a device this torch build has, or the timing fails deep inside torch."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name}: not a device name; use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise CommandError(f"--device {name}: this torch build ({torch.__version__}) has no usable {device.type} "
                           f"device; use --device cpu, or install a torch build for {device.type}.")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise CommandError(f"--device {name}: there are only {count()} {device.type} device(s) (0..{count() - 1}).")


def command_report(args) -> int:
    import torch

    from .reporting import REPORT_FILE, PruningReport
    from .reporting.table import comparison_rows, fraction, plain_table, text_table
    from .speed import dense_counterpart, measure_speed
    from .stats import model_stats

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    try:
        stats = model_stats(model)
    except ValueError as error:
        raise CommandError(str(error)) from None
    config = model.config
    pruned = bool(getattr(config, "is_heterogeneous", False)) or config.model_type.startswith("pruned_")

    recorded = None
    report_path = Path(args.model) / REPORT_FILE
    if report_path.is_file():
        try:
            recorded = PruningReport.from_pretrained(report_path)
        except (ValueError, TypeError, KeyError) as error:
            raise CommandError(f"{report_path} is not a valid pruning report: {error}") from None
    reference = None
    dense_stats, dense_source = None, None
    if recorded is not None:
        dense_stats = recorded.dense_stats
        dense_source = f"recorded in {REPORT_FILE}"
        if recorded.base_model:
            dense_source += f" (base model {recorded.base_model})"
    if pruned:
        reference = dense_counterpart(model)
        if dense_stats is None:
            dense_stats = model_stats(reference)
            dense_source = "the dense architecture in config.json"
    if dense_stats is not None and len(dense_stats.layers) != len(stats.layers):
        raise CommandError(
            f"{report_path} describes {len(dense_stats.layers)} layers but the model has {len(stats.layers)}; "
            f"the report belongs to another model. Remove it or re-save the model."
        )
    if recorded is not None:
        from .reporting import model_mismatch

        mismatch = model_mismatch(recorded, stats, getattr(config, "num_labels", None) if recorded.is_classifier else None)
        if mismatch:
            raise CommandError(f"{report_path} does not describe the model in {args.model}: {mismatch}; the report "
                               f"belongs to another model. Remove it or re-save the model.")

    architecture = (config.architectures or [type(model).__name__])[0]
    print(f"Model: {args.model}  ({architecture}, model_type={config.model_type})")
    if dense_source:
        print(f"Dense reference: {dense_source}")
    print()
    rows = []
    for index, layer in enumerate(stats.layers):
        row = [str(layer.index), str(layer.heads), f"{layer.neurons:,}", f"{layer.params:,}", f"{layer.flops:,}"]
        if dense_stats is not None:
            before = dense_stats.layers[index]
            row[1] = f"{layer.heads}/{before.heads}"
            row[2] = f"{layer.neurons:,}/{before.neurons:,}"
            row.append(fraction(layer.params, before.params))
        rows.append(row)
    header = ["layer", "heads", "MLP width", "params", "FLOPs"]
    if dense_stats is not None:
        header[1:3] = ["heads (kept/dense)", "MLP width (kept/dense)"]
        header.append("params ratio")
    # a hybrid model's layer types and a token-pruned model's token counts, after the layer index
    for title, values in (("tokens", [layer.tokens for layer in stats.layers]),
                          ("type", [layer.layer_type for layer in stats.layers])):
        if any(value is not None for value in values):
            header.insert(1, title)
            for row, value in zip(rows, values):
                row.insert(1, str(value))
    print(plain_table([header, *rows]))
    print()

    speed = None
    if not args.no_speed:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        _check_device(device)
        try:
            speed = measure_speed(
                model, reference, batch_size_throughput=args.batch_size, repeats=args.repeats, warmup=args.warmup,
                device=device,
            )
        except (RuntimeError, ValueError) as error:
            raise CommandError(f"timing on {device} failed: {error}") from None
    totals = comparison_rows(dense_stats, stats, speed=speed)
    if dense_stats is not None:
        print(text_table(totals, ["total", "dense", "this model", "this model / dense"]))
    else:
        print(text_table(totals, ["total", "this model"], dense=False))
    if speed is not None:
        count = speed.get("torch_threads")
        threads = f", {count} torch thread{'s' if count != 1 else ''}" if count else ""
        paired = ""
        if reference is not None:
            paired = ", interleaved with the dense architecture (same config, fresh weights)"
        print(
            f"\nSpeed measured on {speed['hardware']} ({speed['device']}{threads}, {speed['dtype']}): median of "
            f"{speed['repeats']} runs after {speed['warmup']} warm-up runs{paired}."
        )
    if args.onnx:
        _report_onnx_speed(model, reference, args)
    return 0


def _report_onnx_speed(model, reference, args) -> None:
    """The ONNX Runtime rows: the model against its dense architecture, both exported, timed interleaved."""
    from .export import onnx_runtime_speed
    from .reporting.table import speed_rows, text_table

    if reference is None:
        raise CommandError("--onnx compares the model with its dense architecture, and this model has none (it is "
                           "not pruned); time it with onnxruntime directly.")
    try:
        speed = onnx_runtime_speed(model, reference, batch_size_throughput=args.batch_size, repeats=args.repeats,
                                   warmup=args.warmup)
    except (ImportError, RuntimeError, ValueError) as error:
        raise CommandError(f"ONNX Runtime timing failed: {error}") from None
    print()
    print(text_table(speed_rows(speed), ["ONNX Runtime", "dense", "this model", "this model / dense"]))
    print(f"\nONNX Runtime speed: {speed['runtime']}, median of {speed['repeats']} runs after {speed['warmup']} "
          f"warm-up runs, interleaved with the dense architecture (same config, fresh weights), both exported with "
          f"a dynamic batch.")


if __name__ == "__main__":  # python -m hf_vitprune.cli
    sys.exit(main())
