"""Prune a Hugging Face ViT/DeiT image classifier with hf_vitprune (GOHSP by default).

One GPU:
    python examples/prune_imagenet.py --model_name_or_path facebook/deit-small-patch16-224 \
        --dataset_name imagenet-1k --target_sparsity 0.4 --output_dir deit-small-gohsp-40 --bf16

Several GPUs (DDP; FSDP with accelerate_configs/fsdp.yaml):
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/prune_imagenet.py \
        --config examples/configs/deit_small_imagenet.yaml

CPU processes (gloo):
    torchrun --nproc_per_node 2 examples/prune_imagenet.py --train_dir data/train --validation_dir data/val \
        --model_name_or_path path/to/vit --target_sparsity 0.4

Offline default (no arguments): a small ViT on scikit-learn's digits, pruned to 40% fewer parameters.
Arguments: ModelArguments and DataArguments in hf_vitprune/recipe.py, every PruningConfig field,
and every TrainingArguments field; `--config file.yaml` supplies any of them from a file.
"""

from hf_vitprune.recipe import main

if __name__ == "__main__":
    raise SystemExit(main())
