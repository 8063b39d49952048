"""Worker of the dense model's distributed training: ``torchrun ... -m benchmarks.train_dense settings.json``.

Started by :func:`benchmarks.common.train_or_reuse_dense` when ``dense_processes > 1``; each
process loads the data, trains its share of every batch and the main process writes the cache.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers

from .common import Settings, load_data, train_dense


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: torchrun --standalone --nproc_per_node N -m benchmarks.train_dense SETTINGS.json")
    settings = Settings(**json.loads(Path(argv[0]).read_text()))
    transformers.logging.set_verbosity_warning()
    torch.set_num_threads(settings.threads)
    train_dense(settings, load_data(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
