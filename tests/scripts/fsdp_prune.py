"""Prune under accelerate's FSDP plugin (version 2): run by tests/test_fsdp.py.

``python fsdp_prune.py OUT single METHOD``: one process, no FSDP, batch 16, one uninterrupted run
in ``OUT/reference``. ``torchrun --nproc_per_node 2 fsdp_prune.py OUT fsdp METHOD``: FSDP over 2
processes, batch 8 each (the same 16 images per step), the same run in ``OUT/reference``, then the
run killed after a search step and resumed in ``OUT/resumed_search``, and killed after a
fine-tuning step and resumed in ``OUT/resumed_finetune`` (checkpoints every 2 steps, sharded).

Each rank writes the plan it derived (``<run>/rank<k>_plan.json``); the main process saves the
pruned models (``<run>/model``) and, for the uninterrupted run, the evaluation losses of the dense
model, at the end of train() and after it (``losses.json``); a resumed run writes the global step each phase restarted from
(``first_steps.json``). SGD, so that the runs can be compared tightly: Adam divides by the root of tiny
second moments, which turns the float noise of a different reduction order into visible steps.

accelerate enables FSDP only on accelerators (on CPU its state says MULTI_CPU and the plugin is
dropped), so without 2 GPUs this script runs on CPU and makes accelerate's state take the FSDP plugin
anyway: everything after that, ``fully_shard`` over gloo included, is accelerate's and torch's own
FSDP2 code path.
"""

import json
import sys
from pathlib import Path

import torch
from distributed_prune import tiny_model_and_data  # this script's folder is on sys.path
from transformers import TrainerCallback, TrainingArguments

from hf_vitprune import PruningConfig, PruningTrainer

ON_GPUS = torch.cuda.device_count() >= 2  # one GPU per process; otherwise 2 CPU processes over gloo
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["ViTLayer"], "state_dict_type": "SHARDED_STATE_DICT"}


def force_fsdp_on_cpu() -> None:
    """Keep accelerate's FSDP plugin on a CPU-only machine (see the module docstring)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original, plugins = AcceleratorState.__init__, []

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)  # every call re-reads the process state, which says MULTI_CPU
        if kwargs.get("fsdp_plugin") is not None:
            plugins.append(kwargs["fsdp_plugin"])
        if plugins and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugins[0]

    AcceleratorState.__init__ = init


class Crash(TrainerCallback):
    """Stops the run (as a kill would) after the ``step``-th optimizer step of ``phase``, past a checkpoint."""

    def __init__(self, trainer, phase: str, step: int):
        self.trainer, self.phase, self.step, self.seen = trainer, phase, step, 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.phase == self.phase:
            self.seen += 1
            if self.seen == self.step:
                raise KeyboardInterrupt("simulated kill")


class FirstSteps(TrainerCallback):
    """The global step each phase's training starts from: past 0 (and past the search) only when it resumed."""

    def __init__(self, trainer):
        self.trainer, self.first = trainer, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.first.setdefault(self.trainer.phase, state.global_step)


def make_trainer(output_dir: Path, fsdp: bool, method: str) -> PruningTrainer:
    model, data = tiny_model_and_data(intermediate_size=36)
    args = TrainingArguments(
        str(output_dir), max_steps=8, per_device_train_batch_size=8 if fsdp else 16, per_device_eval_batch_size=8,
        learning_rate=0.05, optim="sgd", report_to=[], save_strategy="steps", save_steps=2, disable_tqdm=True,
        seed=0, use_cpu=not ON_GPUS, **({"fsdp": True, "fsdp_config": FSDP_CONFIG} if fsdp else {}))
    if method == "gohsp":
        pruning = PruningConfig(target_sparsity=0.4, calibration_samples=32, admm_update_steps=2, admm_fraction=0.5)
    else:
        pruning = PruningConfig(method=method, target_sparsity=0.4, calibration_samples=32)
    return PruningTrainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(24)),
                          pruning_config=pruning)


def run(output_dir: Path, fsdp: bool, method: str, crash: tuple[str, int] | None = None) -> None:
    trainer = make_trainer(output_dir, fsdp, method)
    if crash is not None:
        trainer.add_callback(Crash(trainer, *crash))
        try:
            trainer.train()
        except KeyboardInterrupt:
            pass
        else:
            raise RuntimeError(f"the run was not stopped at {crash}")
        trainer = make_trainer(output_dir, fsdp, method)
        first_steps = FirstSteps(trainer)
        trainer.add_callback(first_steps)
        trainer.train(resume_from_checkpoint=True)
        if trainer.is_world_process_zero():
            (output_dir / "first_steps.json").write_text(json.dumps(first_steps.first))
    else:  # evaluated before (whole), during (sharded, at the end of train) and after (gathered again)
        losses = {"dense": trainer.evaluate_dense()["dense_loss"], "train_end": trainer.train().metrics["eval_loss"],
                  "after": trainer.evaluate()["eval_loss"]}
        if trainer.is_world_process_zero():
            (output_dir / "losses.json").write_text(json.dumps(losses))
    (output_dir / f"rank{trainer.accelerator.process_index}_plan.json").write_text(trainer.plan.to_json_string())
    trainer.save_model(str(output_dir / "model"))


def main(output_dir: str, mode: str, method: str = "gohsp") -> None:
    out, fsdp = Path(output_dir), mode == "fsdp"
    if fsdp and not ON_GPUS:
        force_fsdp_on_cpu()
    run(out / "reference", fsdp, method)
    if fsdp:
        phase = "admm" if method == "gohsp" else method
        run(out / "resumed_search", fsdp, method, crash=(phase, 3))
        run(out / "resumed_finetune", fsdp, method, crash=("finetune", 3))


if __name__ == "__main__":
    main(*sys.argv[1:])
