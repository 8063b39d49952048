"""Cost of the pruning pipeline itself: an ADMM step against a plain step, and peak memory per phase.

*Step time* (:func:`time_training_steps`): two copies of the dense model, the same batch, each with
its own AdamW; one optimizer step is ``PruningTrainer.compute_loss`` + backward + ``optimizer.step``,
with the trainer's phase set to the method's search phase ``"admm"`` (label loss, distillation from the dense
model and rho/2 ||W - Z + U||^2) or to the fine-tuning phase (label loss and distillation: the step the
pipeline takes when it does not search). gohsp runs here with ``admm_fraction`` 0.5 whatever the benchmark's
share, since in one shot there is no ADMM step to time. The two alternate (plain, ADMM, ADMM, plain, ...)
and each figure is the median. The Z/U update (projection onto the budget, ``trainer.method.update()``) runs
once every ``admm_update_steps`` steps; its median time divided by that interval is added to the
ADMM step, so the ratio is the whole per-step cost of ADMM. The trainer state is the one the
pipeline has at the start of its ADMM phase (``method.setup``: GOHSP importance, Z = projection of W, U = 0).

*Peak memory* (:func:`measure_memory`): each phase runs in a fresh Python process
(``python -m benchmarks.measure --phase ...``) that loads the data and the dense model, then resets
the kernel's peak-RSS counter (``/proc/self/clear_refs``) and records the current RSS as the
baseline; the figure is VmHWM at the end of the phase minus that baseline, i.e. the memory the phase
adds on top of the loaded data and model. ``admm``: a ``PruningTrainer`` (its teacher copy, the
ranking on the calibration set, Z and U, AdamW state, activations) through ``memory_steps`` ADMM
steps; ``plain``: an ordinary ``Trainer`` fine-tuning the same dense model for the same steps and
batch. torch allocates CPU tensors with malloc, so RSS is what it really costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from hf_vitprune import PruningTrainer
from hf_vitprune.methods import SearchContext
from hf_vitprune.state import FINETUNE

from .common import (
    Settings,
    batch_of,
    current_rss_bytes,
    load_data,
    load_dense,
    peak_rss_bytes,
    pruning_config,
    reset_peak_rss,
    training_arguments,
)

WARMUP_STEPS = 3
TIMED_ADMM_FRACTION = 0.5  # the ADMM share the step is timed at (its cost per step does not depend on it)


def time_training_steps(settings: Settings, data) -> dict:
    """Median seconds of one plain and one ADMM optimizer step on the dense-shaped model (see module doc)."""
    sparsity = max(settings.sparsities)
    plain, admm_model = load_dense(settings).train(), load_dense(settings).train()
    batch = batch_of(data["train"], settings.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        config = pruning_config(settings, "gohsp", sparsity, seed=0)
        config = dataclasses.replace(  # an ADMM search to time, also where the benchmark prunes in one shot
            config, method_options=dataclasses.replace(config.method_options, admm_fraction=TIMED_ADMM_FRACTION))
        args = training_arguments(settings, tmp, epochs=1, learning_rate=settings.prune_learning_rate, seed=0)
        trainer = PruningTrainer(model=admm_model, args=args, train_dataset=data["train"], pruning_config=config)
        calibration = [batch_of(data["train"], settings.calibration_samples)]
        # The trainer's state at the start of its ADMM phase: importance, Z = Proj(W), U = 0.
        search = trainer.method
        search.setup(SearchContext(model=admm_model, budget=config.budget,
                                   search_steps=search.search_steps(trainer._total_optimizer_steps()),
                                   calibration_batches=lambda: calibration))
        optimizers = {
            None: torch.optim.AdamW(plain.parameters(), lr=settings.prune_learning_rate,
                                    weight_decay=settings.weight_decay),
            "admm": torch.optim.AdamW(admm_model.parameters(), lr=settings.prune_learning_rate,
                                      weight_decay=settings.weight_decay),
        }
        models = {None: plain, "admm": admm_model}

        def step(phase) -> float:
            trainer.phase = FINETUNE if phase is None else search.phase_name
            started = time.perf_counter()
            loss = trainer.compute_loss(models[phase], batch)
            loss.backward()
            optimizers[phase].step()
            optimizers[phase].zero_grad(set_to_none=True)
            return time.perf_counter() - started

        times = {None: [], "admm": []}
        for i in range(WARMUP_STEPS + settings.step_repeats):
            for phase in ((None, "admm") if i % 2 == 0 else ("admm", None)):
                elapsed = step(phase)
                if i >= WARMUP_STEPS:
                    times[phase].append(elapsed)
        trainer.phase = search.phase_name
        updates = []
        for _ in range(max(3, settings.step_repeats // 3)):
            started = time.perf_counter()
            search.update(admm_model)
            updates.append(time.perf_counter() - started)
    plain_s, admm_s = statistics.median(times[None]), statistics.median(times["admm"])
    update_s = statistics.median(updates)
    per_step = admm_s + update_s / settings.admm_update_steps
    return {
        "plain_step_seconds": plain_s,
        "admm_step_seconds_without_update": admm_s,
        "zu_update_seconds": update_s,
        "admm_update_steps": settings.admm_update_steps,
        "admm_step_seconds": per_step,
        "ratio": per_step / plain_s,
        "ratio_without_update": admm_s / plain_s,
        "batch_size": len(batch["labels"]),
        "repeats": settings.step_repeats,
        "warmup": WARMUP_STEPS,
        "torch_threads": torch.get_num_threads(),
        "sparsity": sparsity,
        "plain_phase": FINETUNE,  # the plain step distils from the dense model, as the ADMM one does
        "admm_fraction": TIMED_ADMM_FRACTION,
    }


# --------------------------------------------------------------------------- peak memory


class _PhasePeak(TrainerCallback):
    """Reads VmHWM when the ADMM phase (or a plain Trainer's training) ends."""

    def __init__(self, trainer=None):
        self.trainer, self.peak = trainer, None

    def on_train_end(self, args, state, control, **kwargs):
        if self.peak is None and (self.trainer is None or self.trainer.phase == self.trainer.method.phase_name):
            self.peak = peak_rss_bytes()


def _memory_phase(settings: Settings, phase: str) -> dict:
    torch.set_num_threads(settings.threads)
    steps = max(settings.memory_steps, settings.admm_update_steps)
    data = load_data(settings)
    train = data["train"].head(steps * settings.batch_size)
    model = load_dense(settings)
    del data
    with tempfile.TemporaryDirectory() as tmp:
        import gc

        gc.collect()
        baseline = current_rss_bytes()
        reset_peak_rss()
        if phase == "plain":
            args = training_arguments(settings, tmp, epochs=1, learning_rate=settings.prune_learning_rate, seed=0,
                                      max_steps=steps)
            trainer = Trainer(model=model, args=args, train_dataset=train)
            callback = _PhasePeak()
        else:
            # steps + 1 in all and admm_fraction 0.99: `steps` ADMM steps, then one fine-tuning step
            args = training_arguments(settings, tmp, epochs=1, learning_rate=settings.prune_learning_rate, seed=0,
                                      max_steps=steps + 1)
            config = pruning_config(settings, "gohsp", max(settings.sparsities), seed=0)
            config = dataclasses.replace(
                config, method_options=dataclasses.replace(config.method_options, admm_fraction=0.99))
            trainer = PruningTrainer(model=model, args=args, train_dataset=train, pruning_config=config)
            callback = _PhasePeak(trainer)
        trainer.add_callback(callback)
        trainer.train()
    return {"phase": phase, "steps": steps, "batch_size": settings.batch_size, "baseline_rss_bytes": baseline,
            "peak_rss_bytes": callback.peak, "peak_delta_bytes": callback.peak - baseline,
            "torch_threads": settings.threads}


def measure_memory(settings: Settings) -> dict:
    """Peak-RSS increase of the ADMM phase and of plain fine-tuning, each in a fresh process."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings_file = Path(tmp) / "settings.json"
        settings_file.write_text(json.dumps(settings.to_dict()))
        for phase in ("plain", "admm"):
            out = Path(tmp) / f"{phase}.json"
            command = [sys.executable, "-m", "benchmarks.measure", "--phase", phase, "--settings", str(settings_file),
                       "--out", str(out)]
            completed = subprocess.run(command, capture_output=True, text=True,
                                       cwd=Path(__file__).resolve().parent.parent)
            if completed.returncode != 0:
                raise RuntimeError(f"The {phase} memory process failed:\n{completed.stderr[-4000:]}")
            results[phase] = json.loads(out.read_text())
    results["ratio"] = results["admm"]["peak_delta_bytes"] / results["plain"]["peak_delta_bytes"]
    results["method"] = ("peak RSS (VmHWM, reset through /proc/self/clear_refs after loading data and model) minus "
                         "the RSS at that moment, one fresh process per phase")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Peak memory of one training phase (run by benchmarks.run).")
    parser.add_argument("--phase", choices=("plain", "admm"), required=True)
    parser.add_argument("--settings", required=True, help="JSON file of benchmarks.common.Settings.")
    parser.add_argument("--out", required=True, help="Where to write the JSON result.")
    args = parser.parse_args(argv)
    settings = Settings(**json.loads(Path(args.settings).read_text()))
    result = _memory_phase(settings, args.phase)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
