"""Choose the dense model of the Fashion-MNIST benchmark on the validation split (never the test split).

Trains one candidate ViT with the benchmark's recipe and prints its validation accuracy after every
epoch and its seconds per epoch, e.g.::

    python -m benchmarks.sizing --hidden_size 128 --intermediate_size 256 --patch_size 7 --epochs 8

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
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--intermediate_size", type=int, default=256)
    parser.add_argument("--patch_size", type=int, default=7)
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--augment", action="store_true", help="Random flips and shifts of the training images.")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_warning()
    torch.set_num_threads(args.threads)
    model_config = dict(FASHION_MNIST["model"], hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                        num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
                        patch_size=args.patch_size)
    settings = Settings(**dict(FASHION_MNIST, model=model_config, augment=args.augment))
    data = load_data(settings)
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**model_config, num_labels=10))
    with tempfile.TemporaryDirectory() as tmp:
        training = training_arguments(settings, tmp, epochs=args.epochs, learning_rate=args.learning_rate, seed=0,
                                      eval_strategy="epoch", logging_steps=10_000)
        trainer = Trainer(model=model, args=training, train_dataset=data["train"], eval_dataset=data["validation"],
                          compute_metrics=make_compute_metrics())
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    curve = {round(e["epoch"], 2): round(e["eval_accuracy"], 4) for e in trainer.state.log_history
             if "eval_accuracy" in e}
    print(json.dumps({"model": model_config, "params": sum(p.numel() for p in model.parameters()),
                      "epochs": args.epochs, "learning_rate": args.learning_rate, "augment": args.augment, "threads": args.threads,
                      "seconds_per_epoch": round(seconds / args.epochs, 1), "validation_accuracy": curve}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
