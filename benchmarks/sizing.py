"""Choose the dense model of the Fashion-MNIST benchmark on the validation split (never the test split).

Trains one candidate ViT with the benchmark's recipe and prints its validation accuracy after every
epoch and its seconds per epoch. Every flag defaults to the chosen preset, so only the differences are
given, e.g.::

    python -m benchmarks.sizing --num_hidden_layers 6 --epochs 35
    python -m benchmarks.sizing --no-augment --epochs 50 --device cuda   # screen on a GPU, confirm on the CPU

The chosen candidate is the ``FASHION_MNIST`` preset in ``benchmarks/common.py``; the candidates
tried and what they gave are listed in BENCHMARKS.md ("How the dense model was chosen").
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
import transformers

from hf_vitprune import model_stats

from .common import FASHION_MNIST, Settings, load_data, load_dense, train_dense


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset_model = FASHION_MNIST["model"]
    parser.add_argument("--hidden_size", type=int, default=preset_model["hidden_size"])
    parser.add_argument("--num_hidden_layers", type=int, default=preset_model["num_hidden_layers"])
    parser.add_argument("--num_attention_heads", type=int, default=preset_model["num_attention_heads"])
    parser.add_argument("--intermediate_size", type=int, default=preset_model["intermediate_size"])
    parser.add_argument("--patch_size", type=int, default=preset_model["patch_size"])
    parser.add_argument("--epochs", type=float, default=FASHION_MNIST["dense_epochs"])
    parser.add_argument("--learning_rate", type=float, default=FASHION_MNIST["dense_learning_rate"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=FASHION_MNIST["augment"],
                        help="Random flips and shifts of the training images.")
    parser.add_argument("--weight_decay", type=float, default=Settings.weight_decay)
    parser.add_argument("--label_smoothing", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda screens many candidates quickly; the chosen one is confirmed on the CPU.")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_warning()
    torch.set_num_threads(args.threads)
    model_config = dict(preset_model, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                        num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
                        patch_size=args.patch_size)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(**dict(FASHION_MNIST, model=model_config, dense_epochs=args.epochs,
                                   dense_learning_rate=args.learning_rate, augment=args.augment,
                                   weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                                   dense_processes=1, cache_dir=tmp))
        info = train_dense(settings, load_data(settings), seed=args.seed, use_cpu=args.device == "cpu")
        params = model_stats(load_dense(settings)).params
    curve = {round(point["epoch"], 2): round(point["validation_accuracy"], 4) for point in info["validation_curve"]}
    print(json.dumps({"model": model_config, "params": params, "epochs": args.epochs,
                      "learning_rate": args.learning_rate, "augment": args.augment, "threads": args.threads,
                      "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing, "seed": args.seed,
                      "device": args.device, "seconds_per_epoch": round(info["train_seconds"] / args.epochs, 1),
                      "validation_accuracy": curve}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
