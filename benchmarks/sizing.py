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
import time

import torch
import transformers
from transformers import Trainer, ViTConfig, ViTForImageClassification

from hf_vitprune.metrics import make_compute_metrics

from .common import FASHION_MNIST, Settings, load_data, training_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model, preset = FASHION_MNIST["model"], FASHION_MNIST
    parser.add_argument("--hidden_size", type=int, default=model["hidden_size"])
    parser.add_argument("--num_hidden_layers", type=int, default=model["num_hidden_layers"])
    parser.add_argument("--num_attention_heads", type=int, default=model["num_attention_heads"])
    parser.add_argument("--intermediate_size", type=int, default=model["intermediate_size"])
    parser.add_argument("--patch_size", type=int, default=model["patch_size"])
    parser.add_argument("--epochs", type=float, default=preset["dense_epochs"])
    parser.add_argument("--learning_rate", type=float, default=preset["dense_learning_rate"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=preset["augment"],
                        help="Random flips and shifts of the training images.")
    parser.add_argument("--weight_decay", type=float, default=Settings.weight_decay)
    parser.add_argument("--label_smoothing", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda screens many candidates quickly; the chosen one is confirmed on the CPU.")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_warning()
    torch.set_num_threads(args.threads)
    model_config = dict(FASHION_MNIST["model"], hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                        num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
                        patch_size=args.patch_size)
    settings = Settings(**dict(FASHION_MNIST, model=model_config, augment=args.augment, weight_decay=args.weight_decay,
                               label_smoothing=args.label_smoothing))
    data = load_data(settings)
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(ViTConfig(**model_config, num_labels=10))
    with tempfile.TemporaryDirectory() as tmp:
        training = training_arguments(settings, tmp, epochs=args.epochs, learning_rate=args.learning_rate, seed=args.seed,
                                      eval_strategy="epoch", logging_steps=10_000, use_cpu=args.device == "cpu",
                                      label_smoothing_factor=args.label_smoothing)
        trainer = Trainer(model=model, args=training, train_dataset=data["train"], eval_dataset=data["validation"],
                          compute_metrics=make_compute_metrics())
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    curve = {round(e["epoch"], 2): round(e["eval_accuracy"], 4) for e in trainer.state.log_history
             if "eval_accuracy" in e}
    print(json.dumps({"model": model_config, "params": sum(p.numel() for p in model.parameters()),
                      "epochs": args.epochs, "learning_rate": args.learning_rate, "augment": args.augment, "threads": args.threads,
                      "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing, "seed": args.seed,
                      "device": args.device,
                      "seconds_per_epoch": round(seconds / args.epochs, 1), "validation_accuracy": curve}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
