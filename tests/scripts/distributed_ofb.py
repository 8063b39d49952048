"""Run by tests/test_ofb.py under `torchrun --nproc_per_node 2`: a short OFB search on CPU.

Each rank writes what it derived (rank<k>.json: the plan, the searched widths, the surviving
candidates) so the test can compare the two ranks.
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

from hf_vitprune import PruningConfig, PruningTrainer


def main(output_dir: str) -> None:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                       image_size=16, patch_size=4, num_labels=5)
    model = ViTForImageClassification(config)
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({
        "pixel_values": torch.randn(64, 3, 16, 16, generator=generator).numpy(),
        "labels": torch.randint(0, 5, (64,), generator=generator).numpy(),
    }).with_format("torch")
    args = TrainingArguments(output_dir, max_steps=10, per_device_train_batch_size=8, learning_rate=1e-3,
                             report_to=[], save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True)
    pruning = PruningConfig(method="ofb", target_flops_reduction=0.3, calibration_samples=16, shrink_interval=2,
                            warmup_fraction=0.2)
    trainer = PruningTrainer(model=model, args=args, train_dataset=data, pruning_config=pruning)
    trainer.train()
    rank = trainer.accelerator.process_index
    (Path(output_dir) / f"rank{rank}.json").write_text(json.dumps({
        "plan": trainer.plan.to_dict(),
        "searched": trainer.method.searched_widths,
        "world_size": trainer.accelerator.num_processes,
    }))


if __name__ == "__main__":
    main(sys.argv[1])
