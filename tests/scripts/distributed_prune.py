"""Run under `torchrun --nproc_per_node 2`: a short pruning on CPU, gohsp (tests/test_trainer.py) or,
with a second argument ``ofb``, ``spvit_tokens`` or ``spvit_conv``, an OFB search (tests/test_ofb.py), token
pruning (tests/test_spvit_tokens.py) or the attention-to-convolution search (tests/test_spvit_conv.py).

Each rank writes the plan it derived (rank<k>_plan.json) and what decided it (gohsp: its graph head
importance, rank<k>_importance.json; ofb: its searched widths, the units sliced out mid-search and
the weights' sum after each search step, rank<k>.json; spvit_tokens: its stages, spvit_conv: its layer map,
and the same sums), and the
main process
saves the final model, so the tests can compare ranks and reload the result.
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification

from hf_vitprune import PruningConfig, PruningTrainer


class SearchWeightSums(TrainerCallback):
    """The sum of the model's weights after every search step: equal on every rank only if DDP kept them in step."""

    def __init__(self, trainer):
        self.trainer, self.sums = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.phase != "finetune":
            self.sums.append(float(sum(p.detach().double().sum() for p in self.trainer.model.parameters())))


def tiny_model_and_data(intermediate_size: int = 37) -> tuple[ViTForImageClassification, Dataset]:
    """A seeded 3-layer ViT for 16x16 images and 64 random images in 5 classes, the same on every process."""
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=intermediate_size, image_size=16, patch_size=4, num_labels=5)
    model = ViTForImageClassification(config)
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({
        "pixel_values": torch.randn(64, 3, 16, 16, generator=generator).numpy(),
        "labels": torch.randint(0, 5, (64,), generator=generator).numpy(),
    }).with_format("torch")
    return model, data


def main(output_dir: str, method: str = "gohsp") -> None:
    model, data = tiny_model_and_data()
    args = TrainingArguments(output_dir, max_steps=6 if method == "gohsp" else 10, per_device_train_batch_size=8,
                             per_device_eval_batch_size=8, learning_rate=1e-3, report_to=[], save_strategy="no",
                             disable_tqdm=True, seed=0, use_cpu=True)
    if method == "gohsp":
        pruning = PruningConfig(target_sparsity=0.4, calibration_samples=32, admm_update_steps=2)
    elif method == "spvit_tokens":
        pruning = PruningConfig(method="spvit_tokens", target_flops_reduction=0.3, calibration_samples=16)
    elif method == "spvit_conv":  # gates that move within the 5 search steps
        pruning = PruningConfig(method="spvit_conv", target_flops_reduction=0.3, calibration_samples=16,
                                search_fraction=0.5, arch_learning_rate=0.3)
    else:
        # fast-moving logits: candidates drop, and units are sliced out, within the 5 search steps
        pruning = PruningConfig(method="ofb", target_flops_reduction=0.5, calibration_samples=16, shrink_interval=2,
                                warmup_fraction=0.2, arch_learning_rate=0.5, shrink_threshold=0.9)
    trainer = PruningTrainer(model=model, args=args, train_dataset=data, pruning_config=pruning)
    weight_sums = SearchWeightSums(trainer)
    trainer.add_callback(weight_sums)
    trainer.train()
    rank = trainer.accelerator.process_index
    out = Path(output_dir)
    (out / f"rank{rank}_plan.json").write_text(trainer.plan.to_json_string())
    if method == "gohsp":
        importance = [t.tolist() for t in trainer.method.importance.heads]
        (out / f"rank{rank}_importance.json").write_text(json.dumps(
            {"importance": importance, "world_size": trainer.accelerator.num_processes}))
    elif method == "spvit_tokens":
        (out / f"rank{rank}.json").write_text(json.dumps({
            "stages": trainer.method.stages.to_dict(), "search_weights": weight_sums.sums,
            "world_size": trainer.accelerator.num_processes}))
    elif method == "spvit_conv":
        (out / f"rank{rank}.json").write_text(json.dumps({
            "layer_types": trainer.method.types, "search_weights": weight_sums.sums,
            "world_size": trainer.accelerator.num_processes}))
    else:
        sliced = max((entry.get("ofb_sliced_units", 0) for entry in trainer.state.log_history), default=0)
        (out / f"rank{rank}.json").write_text(json.dumps({
            "plan": trainer.plan.to_dict(), "searched": trainer.method.searched_widths, "sliced_units": sliced,
            "search_weights": weight_sums.sums, "world_size": trainer.accelerator.num_processes}))
    trainer.save_model(str(out / "model"))


if __name__ == "__main__":
    main(*sys.argv[1:])
