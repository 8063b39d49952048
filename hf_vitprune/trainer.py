"""PruningTrainer: one ``train()`` searches what to remove, compacts the model and fine-tunes it.

Phases (each one ordinary ``Trainer.train()`` call, so every TrainingArguments feature keeps working):

1. *Search* (the method's share of the steps, checkpoints under ``output_dir/<phase name>``): the
   method (``PruningConfig.method``, found in :mod:`hf_vitprune.methods`) sets up on the dense
   model, adds its loss terms in ``compute_loss`` and does its per-step work from a callback.
   A method may remove units as it goes (``pending_compaction``): the trainer then compacts the
   model in place, slices the optimizer state alike and re-wraps the model for DDP.
2. *Compaction*: the method's ``finalize()`` gives the plan; ``apply_plan`` removes the units.
3. *Fine-tuning* (the remaining steps, under ``output_dir/finetune``): the smaller model trains
   with a fresh optimizer and scheduler, distilling from a frozen copy of the dense model; then
   it is evaluated.

The trainer names no method: everything method-specific goes through the hooks of
:class:`~hf_vitprune.methods.PruningMethod`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback, TrainerState, get_scheduler
from transformers.trainer_utils import get_last_checkpoint, has_length, set_seed
from transformers.utils import logging as hf_logging

from .architectures import family_of, find_encoder_layers, meta_copy, set_input_size
from .config import PruningConfig
from .distillation import classification_logits, distillation_loss
from .fileio import atomic_directory, check_writable
from .methods import METHODS, PruningMethod, SearchContext, get_method
from .optimizer_state import replace_parameters
from .plan import PruningPlan
from .reporting import (
    REPORT_FILE,
    PruningReport,
    dataset_name,
    metrics_from_logs,
    push_model_directory,
    rerender_model_card,
    training_summary,
    write_model_card,
)
from .state import (
    FINETUNE,
    STATE_JSON,
    PruningState,
    config_differences,
    resume_checkpoint,
)
from .sharding import gathered_model, has_sharded_parameters
from .stats import model_stats
from .surgery import apply_plan, compaction_indices

logger = hf_logging.get_logger(__name__)

class SearchStepCallback(TrainerCallback):
    """Calls the method's per-step work around every optimizer step of the search phase."""

    def __init__(self, trainer: PruningTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.phase == trainer.method.phase_name:
            trainer.method.before_optimizer_step(trainer.accelerator.unwrap_model(trainer.model))

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.phase == trainer.method.phase_name:
            for group in trainer.method.parameter_groups():  # Trainer zeroes the model's gradients only
                for parameter in group["params"]:
                    parameter.grad = None
            trainer.method.on_step_end(trainer.accelerator.unwrap_model(trainer.model), state.global_step)
            plan = trainer.method.pending_compaction()
            if plan is not None:
                trainer._compact_during_search(plan)


class ContinuousEpochCallback(TrainerCallback):
    """Counts fine-tuning epochs on from the search's, as the step count is (see ``_init_training_state``)."""

    def __init__(self, trainer: PruningTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.phase == FINETUNE and state.epoch is not None:
            state.epoch += self.trainer._epoch_offset


class PruningStateCallback(TrainerCallback):
    """Writes the pruning state into every checkpoint the Trainer saves (main process only)."""

    def __init__(self, trainer: PruningTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        pruning_state = self.trainer.pruning_state()  # on every process: gathering FSDP-sharded tensors is collective
        if args.should_save:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            pruning_state.save(checkpoint)


class PruningTrainer(Trainer):
    """A ``Trainer`` that returns a structurally pruned, compacted, fine-tuned model.

    Takes ``pruning_config=`` beside the usual Trainer arguments. After ``train()``,
    ``self.model`` is the smaller dense model, ``self.plan`` says what was kept (indices into
    the original model), ``self.method`` is the method that searched, and ``save_model()``
    writes the model, ``pruning_config.json``, ``pruning_plan.json``, ``pruning_report.json``
    and the model card.
    """

    # compute_loss returns a per-batch mean; Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, pruning_config: PruningConfig, **kwargs):
        if not isinstance(pruning_config, PruningConfig):
            raise TypeError(f"pruning_config must be a PruningConfig, got {type(pruning_config).__name__}.")
        super().__init__(*args, **kwargs)
        if (self.args.log_level if self.args.should_log else self.args.log_level_replica) != "passive":
            logger.setLevel(self.args.get_process_log_level())  # as Trainer sets transformers' verbosity
        family_of(self.model)  # unsupported models fail here, before any work
        find_encoder_layers(self.model)
        if not self.label_names:  # DeiT's two-head model takes no labels, but its loss here needs them
            self.label_names = ["labels"]
        self.pruning_config = pruning_config
        size = _training_image_size(self.train_dataset)
        if size is not None:  # cost the model at the resolution it trains at (DINOv2 records 518, runs at 224)
            set_input_size(self.accelerator.unwrap_model(self.model), *size)
        self.method: PruningMethod = get_method(pruning_config.method)(pruning_config)
        self._check_sharding()
        self.phase: str | None = None
        self.plan: PruningPlan | None = None
        self.dense_stats = model_stats(self.model)
        self.base_model_name = getattr(self.model.config, "name_or_path", None) or None
        self.dense_metrics: dict[str, float] | None = None  # evaluate_dense() records them
        self.speed: dict | None = None  # measure_speed() records it
        self.teacher = None
        if pruning_config.distillation_weight > 0:
            self.teacher = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval().requires_grad_(False)
        self.method.teacher = self.teacher
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._latest: dict[str, float] = {}
        self._step_offset = 0  # optimizer steps before the current phase: the search's, while fine-tuning
        self._search_state = None  # the search phase's TrainerState, which fine-tuning continues
        self._epoch_offset = 0.0
        self._dense_shapes = None  # the dense model on the meta device, once a mid-search plan composes against it
        self._search_plan: PruningPlan | None = None  # what mid-search compactions removed, against the dense model
        self._rewrapped = None  # the DDP wrapper made after a mid-search compaction (the loop holds the old one)
        self.add_callback(SearchStepCallback(self))
        self.add_callback(PruningStateCallback(self))
        self.add_callback(ContinuousEpochCallback(self))

    def _check_sharding(self) -> None:
        """Refuse, before any work, parameter sharding that the method's hooks cannot act on."""
        name = self.pruning_config.method
        deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_deepspeed_enabled and getattr(deepspeed, "zero_stage", None) == 3:
            raise ValueError(
                "PruningTrainer cannot prune under DeepSpeed ZeRO stage 3, which leaves every process an empty "
                "placeholder for each parameter it does not own. Use accelerate's FSDP plugin with fsdp_version: 2 "
                "(examples/accelerate_configs/fsdp.yaml), or ZeRO stage 1 or 2."
            )
        if not self.is_fsdp_enabled:
            return
        if getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "PruningTrainer prunes under FSDP version 2 (fully_shard, DTensor parameters) only: set "
                "fsdp_version: 2 in the accelerate config (examples/accelerate_configs/fsdp.yaml), or "
                "TrainingArguments(fsdp_config={'version': 2, ...})."
            )
        if not self.method.supports_sharded_parameters:
            able = sorted(n for n, cls in METHODS.items() if cls.supports_sharded_parameters)
            raise ValueError(
                f"Method {name!r} cannot run under FSDP: its search was not built and checked for sharded "
                f"parameters (PruningMethod.supports_sharded_parameters). Train it without FSDP (DDP: "
                f"examples/accelerate_configs/multi_gpu.yaml), or use a method that shards: {', '.join(able)}."
            )

    # ------------------------------------------------------------------ the pipeline

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        base_output_dir, base_max_steps = self.args.output_dir, self.args.max_steps
        if self.args.should_save:  # a read-only output_dir fails now, not at the save after training
            check_writable(base_output_dir, "output_dir")
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint, base_output_dir)
        saved = PruningState.load(checkpoint) if checkpoint else None
        if saved is not None and saved.phase not in (self.method.phase_name, FINETUNE):
            raise ValueError(
                f"{checkpoint} was written in the {saved.phase!r} phase, which method {self.pruning_config.method!r} "
                f"does not have; resume it with the method that wrote it."
            )
        if saved is not None:
            self._check_same_config(saved, checkpoint)
        total = self._total_optimizer_steps()
        if total < 2:
            raise ValueError(
                f"PruningTrainer needs at least 2 optimizer steps (the search, then fine-tuning); the arguments give "
                f"{total}. Raise num_train_epochs or max_steps."
            )
        search_steps = self.method.search_steps(total)
        budget = self.pruning_config.budget
        self._narrate(
            "Pruning with %s: search for %d steps, then fine-tuning for %d steps (budget: remove %s of the %s)%s",
            self.pruning_config.method, search_steps, total - search_steps, f"{budget.fraction * 100:g}%",
            budget.unit_name, f"; resuming the {saved.phase} phase from {checkpoint}" if saved is not None else "",
        )
        self._search_state = None
        try:
            if saved is None or saved.phase == self.method.phase_name:
                self._run_search(search_steps, base_output_dir, checkpoint, saved, trial, **kwargs)
                self._search_state = self.state
                checkpoint = None
            else:
                self._restore_compacted(saved)
            self._step_offset = search_steps
            output = self._run_finetune(total - search_steps, base_output_dir, checkpoint, trial, **kwargs)
            self._gather_sharded_model()
        finally:
            self.args.output_dir, self.args.max_steps = base_output_dir, base_max_steps
            self._step_offset, self._search_state = 0, None
        if self.eval_dataset is not None:
            output.metrics.update(self.evaluate())
        return output

    def _run_search(self, steps, base_output_dir, checkpoint, saved, trial, **kwargs):
        self.phase = self.method.phase_name
        model = self.accelerator.unwrap_model(self.model)
        self._dense_shapes, self._search_plan, self._rewrapped = None, None, None
        if saved is not None and saved.plan is not None:  # the checkpoint was compacted mid-search: so is the model
            self._dense_shapes = meta_copy(model)
            model = apply_plan(model, saved.plan)
            self._search_plan = saved.plan
        if saved is not None:
            self.method.load_state_dict(saved.tensors, model)
        else:
            set_seed(self.args.seed)
            self.method.setup(SearchContext(model=model, budget=self.pruning_config.budget, search_steps=steps,
                                            calibration_batches=self._calibration_batches, seed=self.args.seed))
        self.args.output_dir, self.args.max_steps = os.path.join(base_output_dir, self.phase), steps
        state_file = os.path.join(checkpoint, "trainer_state.json") if checkpoint else None
        if state_file and os.path.isfile(state_file) and TrainerState.load_from_json(state_file).global_step >= steps:
            # the search had ended at this checkpoint: Trainer would take one more step past max_steps
            self._load_from_checkpoint(checkpoint)
            self.state = TrainerState.load_from_json(state_file)
        else:
            super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        final = self.method.finalize(model)
        self.plan = final if self._search_plan is None else self._search_plan.then(final, self._dense_shapes)
        self._compact(final)
        self._rewrapped = None

    def _run_finetune(self, steps, base_output_dir, checkpoint, trial, **kwargs):
        self.phase = FINETUNE
        self.optimizer, self.lr_scheduler = None, None  # fresh for the compacted parameters
        self.model_wrapped = self.model
        if checkpoint is None:
            set_seed(self.args.seed)
        self.args.output_dir, self.args.max_steps = os.path.join(base_output_dir, FINETUNE), steps
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        """Fine-tuning continues the search's TrainerState: one step count, one log history, one run.

        Callbacks, ``report_to`` integrations and ``trainer_state.json`` then see steps 1..N across
        both phases (checkpoint folders are named by that step too). When a fine-tuning checkpoint
        is resumed, the batches to skip are counted from the fine-tuning phase's own steps.
        """
        epochs_trained, skipped = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)
        offset = self._step_offset
        self._epoch_offset = offset / num_update_steps_per_epoch if offset else 0.0
        if not offset:
            return epochs_trained, skipped
        resumed = resume_from_checkpoint is not None and os.path.isfile(
            os.path.join(resume_from_checkpoint, "trainer_state.json"))
        if resumed:
            local = self.state.global_step - offset
            epochs_trained = local // num_update_steps_per_epoch
            skipped = 0 if self.args.ignore_data_skip else (
                (local % num_update_steps_per_epoch) * self.args.gradient_accumulation_steps)
        else:
            self.state.global_step = offset
            self.state.epoch = self._epoch_offset
            if self._search_state is not None:
                search = self._search_state
                self.state.log_history = list(search.log_history)
                self.state.total_flos = search.total_flos
                self.state.num_input_tokens_seen = search.num_input_tokens_seen
        self.state.max_steps = offset + max_steps
        return epochs_trained, skipped

    def create_optimizer(self, *args, **kwargs):
        """Trainer's optimizer, plus the method's own parameter groups while searching (before the scheduler
        is made, so its schedule covers them too)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.phase == self.method.phase_name:
            known = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for group in self.method.parameter_groups():
                if not any(id(p) in known for p in group["params"]):
                    optimizer.add_param_group(group)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The method may ask for its own learning-rate schedule during the search (ADMM: constant), and keep
        some of its parameter groups at a constant rate (``"lr_schedule": "constant"``)."""
        kind = self.method.search_lr_scheduler() if self.phase == self.method.phase_name else None
        if kind is None or self.lr_scheduler is not None:
            scheduler = super().create_scheduler(num_training_steps, optimizer)
        else:
            self.lr_scheduler = scheduler = get_scheduler(
                kind, optimizer=optimizer if optimizer is not None else self.optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps), num_training_steps=num_training_steps,
            )
            self._created_lr_scheduler = True
        constant = [i for i, group in enumerate(scheduler.optimizer.param_groups)
                    if group.get("lr_schedule") == "constant"]
        if constant and not isinstance(getattr(scheduler, "lr_lambdas", None), list):
            raise ValueError(f"lr_scheduler_type={self.args.lr_scheduler_type!r} cannot keep the method's "
                             f"architecture parameters at a constant rate; choose a schedule such as 'cosine' or "
                             f"'linear', or the method's default schedule option.")
        for i in constant:
            scheduler.lr_lambdas[i] = _constant_rate
            group = scheduler.optimizer.param_groups[i]
            group["lr"] = group["initial_lr"]  # the first step too, warm-up or not
        return scheduler

    def _compact_during_search(self, plan: PruningPlan) -> None:
        """Remove ``plan``'s units now, mid-search: the model in place, the optimizer state alike, DDP re-wrapped."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                f"Method {self.pruning_config.method!r} removes units in the middle of its search, which FSDP and "
                f"DeepSpeed runs cannot do (they shard the parameters). Turn the method's mid-search compaction off "
                f"(OFB: physical_shrinking=False) or train without FSDP/DeepSpeed."
            )
        model = self.accelerator.unwrap_model(self.model)
        if self._search_plan is None:  # the first compaction: the model is still dense
            self._dense_shapes = meta_copy(model)
        before = dict(model.named_parameters())
        positions = compaction_indices(model, plan)
        apply_plan(model, plan)
        replace_parameters(self.optimizer, [(before[name], parameter, positions[name])
                                            for name, parameter in model.named_parameters()
                                            if parameter is not before[name]])
        self._search_plan = (self._search_plan or PruningPlan()).then(plan, self._dense_shapes)
        if isinstance(self.model_wrapped, torch.nn.parallel.DistributedDataParallel):
            # DDP registered the old parameters: a fresh wrapper over the compacted model (every process
            # compacts alike, at the same step). training_step hands it the batches from now on.
            self.model_wrapped = self._rewrapped = self.accelerator.prepare_model(model)
        self.method.after_compaction(model, plan, lambda swaps: replace_parameters(self.optimizer, swaps))
        stats = model_stats(model)
        self._narrate("Compacted mid-search at step %d: %s parameters (%.1f%% of the dense model), %s FLOPs per image "
                      "(%.1f%%)", self.state.global_step, f"{stats.params:,}", 100 * stats.params / self.dense_stats.params,
                      f"{stats.flops:,}", 100 * stats.flops / self.dense_stats.flops)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step, through the DDP wrapper made after a mid-search compaction when there is one."""
        if self._rewrapped is not None and self.phase == self.method.phase_name:
            model = self._rewrapped
        return super().training_step(model, inputs, num_items_in_batch)

    @contextlib.contextmanager
    def _whole_model_outside_fsdp(self):
        """Trainer evaluates and saves through FSDP whenever FSDP is on; a model that is whole on every process
        (the dense one before the search shards it, the result once train() has gathered it) is evaluated and
        saved as without FSDP instead (FSDP2 cannot shard a model for evaluation alone, and its final save
        would write shards, not ``from_pretrained``'s files)."""
        fsdp = self.is_fsdp_enabled
        model = self.accelerator.unwrap_model(self.model)
        if fsdp and not has_sharded_parameters(model):
            self.is_fsdp_enabled = False
            model.to(self.args.device)  # under FSDP, Trainer left the placement to the sharding
        try:
            yield
        finally:
            self.is_fsdp_enabled = fsdp

    def _gather_sharded_model(self) -> None:
        """Under FSDP, make ``self.model`` the plain model with its whole weights on every process.

        After the search that is what compaction slices (fine-tuning then shards the smaller
        model afresh); after fine-tuning it is the result, which evaluates, times and saves as
        without FSDP.
        """
        model = self.accelerator.unwrap_model(self.model)
        if has_sharded_parameters(model):
            self.model = self.model_wrapped = gathered_model(model)
            # accelerate's references to the sharded model and its optimizer state would keep them alive
            # through the next phase, which prepares its own
            self.accelerator.free_memory()

    def _compact(self, plan: PruningPlan) -> None:
        self._gather_sharded_model()
        model = self.accelerator.unwrap_model(self.model)
        apply_plan(model, plan)
        self.model = self.model_wrapped = model
        stats = model_stats(model)
        self._latest.update(
            kept_heads=stats.heads,
            kept_neurons=stats.neurons,
            params=stats.params,
            flops=stats.flops,
            params_ratio=stats.params / self.dense_stats.params,
            flops_ratio=stats.flops / self.dense_stats.flops,
        )
        dense = self.dense_stats
        self._narrate(
            "Compacted: kept %d/%d heads, %d/%d MLP neurons, %s parameters (%.1f%% of %s), %s FLOPs per image "
            "(%.1f%% of %s)",
            stats.heads, dense.heads, stats.neurons, dense.neurons, f"{stats.params:,}", 100 * stats.params / dense.params,
            f"{dense.params:,}", f"{stats.flops:,}", 100 * stats.flops / dense.flops, f"{dense.flops:,}",
        )

    def _restore_compacted(self, saved: PruningState) -> None:
        if saved.plan is None:
            raise ValueError("The fine-tuning checkpoint carries no pruning plan; it was not written by PruningTrainer.")
        self.method.load_state_dict(saved.tensors, self.accelerator.unwrap_model(self.model))
        self.plan = saved.plan
        self._compact(saved.plan)

    def _calibration_batches(self):
        """This process's share of the first ``calibration_samples`` training examples, in order.

        A streamed (length-less) training set gives the first examples of its stream: every process
        reads them and keeps every ``world``-th, as it would from an in-memory set.
        """
        dataset = self.train_dataset
        wanted = self.pruning_config.calibration_samples
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if dataset is None:
            raise ValueError("The calibration set is empty: PruningTrainer needs a non-empty train_dataset.")
        if has_length(dataset):
            count = min(wanted, len(dataset))
            indices = range(rank, count, world)
            if hasattr(dataset, "column_names"):  # a datasets.Dataset: select, and drop what the model does not take
                subset = self._remove_unused_columns(dataset.select(indices), description="calibration")
            else:
                subset = torch.utils.data.Subset(dataset, list(indices))
            collate = self.data_collator
        else:
            examples = list(itertools.islice(iter(dataset), wanted))
            count = len(examples)
            subset = examples[rank::world]
            collate = self._get_collator_with_removed_columns(self.data_collator, description="calibration")
        if count == 0:
            raise ValueError("The calibration set is empty: PruningTrainer needs a non-empty train_dataset.")
        loader = torch.utils.data.DataLoader(subset, batch_size=self.args.per_device_eval_batch_size,
                                             collate_fn=collate)
        for batch in loader:
            yield self._prepare_inputs(batch)

    # ------------------------------------------------------------------ loss and logging

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's own loss (+ distillation while fine-tuning) (+ the method's terms while searching).

        The label loss is ``super().compute_loss``'s, so ``problem_type``, ``label_smoothing_factor``
        and ``compute_loss_func`` keep working; it is a per-batch mean (``num_items_in_batch`` is
        not passed on) because the distillation and method terms are per-batch means too. DeiT's
        two-head model computes no loss itself: its class-token head gets the label loss, DeiT-style,
        and its distillation head too whenever nothing distils through it.
        """
        inputs = dict(inputs)
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("PruningTrainer needs `labels` in every training batch.")
        if _has_distillation_head(self.accelerator.unwrap_model(model)):
            outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
            logits, distil_logits = classification_logits(outputs)
            loss = self._label_loss(logits, labels)
            if not self._distils_through_token():
                # nothing distils into the distillation head now, yet evaluation averages both heads:
                # it learns from the labels too (DeiT's hard-label variant)
                loss = 0.5 * (loss + self._label_loss(distil_logits, labels))
        else:
            loss, outputs = super().compute_loss(model, dict(inputs), return_outputs=True)
            _, distil_logits = classification_logits(outputs)
        self._metrics["label_loss"].append(loss.detach())
        if model.training and self._distilling():
            loss = self._distil(loss, distil_logits, outputs, inputs)
        if model.training and self.phase == self.method.phase_name:
            terms = self.method.loss_terms(self.accelerator.unwrap_model(model), inputs, outputs)
            for name, term in terms.items():
                self._metrics[name].append(term.detach())
                loss = loss + term
        if model.training:
            self._check_finite(loss)
        return (loss, outputs) if return_outputs else loss

    def _label_loss(self, logits, labels):
        return torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=self.args.label_smoothing_factor)

    def _distilling(self) -> bool:
        """Distillation from the dense model: while fine-tuning, and in the search when the method asks for it."""
        if self.teacher is None:
            return False
        return self.phase == FINETUNE or (self.phase == self.method.phase_name and self.method.distils_during_search())

    def _distils_through_token(self) -> bool:
        return self._distilling() and self.pruning_config.use_distillation_token

    def _distil(self, loss, distil_logits, outputs, inputs):
        config = self.pruning_config
        teacher = self.teacher.to(distil_logits.device)
        with torch.no_grad():
            teacher_logits = teacher(**{key: value for key, value in inputs.items() if key != "labels"}).logits
        if not config.use_distillation_token:
            distil_logits = classification_logits(outputs)[0]
        kd = distillation_loss(distil_logits, teacher_logits, config.distillation_temperature)
        self._metrics["distillation_loss"].append(kd.detach())
        return (1 - config.distillation_weight) * loss + config.distillation_weight * kd

    def _check_finite(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite, reduction="sum") / self.accelerator.num_processes
        if finite.item() < 1:
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise FloatingPointError(
                f"The training loss became {loss.item()} at step {self.state.global_step} of the {self.phase} phase. "
                f"Lower the learning rate or the method's penalty, or check the data. Nothing was saved after the "
                f"failure; the last good checkpoint is {last or 'none (none was saved yet)'}."
            )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the pruning metrics (averaged over steps and processes) to every Trainer log."""
        for key, values in self._metrics.items():
            if values:
                mean = torch.stack(values).mean().reshape(1)
                logs[key] = self.accelerator.gather(mean).mean().item()
        self._metrics.clear()
        if self.phase is not None:
            logs.update(self.method.log_values())
            logs.update(self._latest)
            logs[f"phase_{self.method.phase_name}"] = 1.0 if self.phase == self.method.phase_name else 0.0
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ the run record

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        with self._whole_model_outside_fsdp():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._whole_model_outside_fsdp():
            return super().predict(*args, **kwargs)

    def evaluate_dense(self, eval_dataset=None, metric_key_prefix: str = "dense") -> dict[str, float]:
        """Evaluate the model before pruning and keep the figures for the report and the card."""
        if self.plan is not None:
            raise ValueError("evaluate_dense() measures the dense model: call it before train().")
        metrics = self.evaluate(eval_dataset, metric_key_prefix=metric_key_prefix)
        self.dense_metrics = metrics_from_logs([metrics], prefix=f"{metric_key_prefix}_")
        return metrics

    def measure_speed(self, **kwargs) -> dict:
        """Time the compacted model against the dense one (interleaved) and keep it for the report."""
        from .speed import dense_counterpart, measure_speed

        if self.plan is None:
            raise ValueError("measure_speed() compares the pruned model with the dense one: call it after train().")
        model = self.accelerator.unwrap_model(self.model)
        dense = self.teacher if self.teacher is not None else dense_counterpart(model)
        self.speed = measure_speed(model, dense, **kwargs)
        return self.speed

    def run_record(self, stage: str = "final", **fields) -> PruningReport:
        """The facts of this run as a :class:`~hf_vitprune.reporting.PruningReport` (what the card renders).

        ``fields`` override report fields (``dataset=``, ``license=``, ``speed=``, ...).
        """
        args = self.args
        model = self.accelerator.unwrap_model(self.model)
        fields.setdefault("base_model", self.base_model_name)
        if "metrics_pruned" not in fields:
            fields["metrics_pruned"] = metrics_from_logs(self.state.log_history)
        fields.setdefault("metrics_dense", self.dense_metrics)
        fields.setdefault("speed", self.speed if stage == "final" else None)
        if "dataset" not in fields:
            evaluated = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
            fields["dataset"] = dataset_name(evaluated)
        if "model_name" not in fields:
            fields["model_name"] = args.hub_model_id.split("/")[-1] if args.hub_model_id else os.path.basename(
                os.path.normpath(args.output_dir))
        fields.setdefault("repo_id", args.hub_model_id)
        fields.setdefault("training", training_summary(args))
        return PruningReport.from_models(
            self.dense_stats, model, pruning_config=self.pruning_config, plan=self.plan,
            method_card=self.method.card_info(), stage=stage, **fields,
        )

    # ------------------------------------------------------------------ saving and resuming

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the (compacted) model, ``pruning_config.json``, ``pruning_plan.json``, the report and card.

        Everything (weights, configs, image processor, remote code, plan, report, card) is written into one
        staging directory that moves into place only once complete: a full disk or a kill leaves the
        directory as it was, never weights without their plan and card (docs/failures.md).
        A ``checkpoint-*`` directory gets a checkpoint card; a final save of the compacted model
        measures its speed against the dense model first, unless ``measure_speed()`` already did.
        """
        directory = output_dir or self.args.output_dir
        checkpoint = os.path.basename(os.path.normpath(directory)).startswith("checkpoint-")
        if not self.args.should_save:  # other processes only join the collectives that gather the weights
            with self._whole_model_outside_fsdp():
                super().save_model(output_dir, _internal_call=True)
        else:
            record = self._save_record(checkpoint)
            with atomic_directory(directory) as staging:
                self._save_into(staging, record)
            pickled = os.path.join(directory, "training_args.bin")  # a stock Trainer's save there before
            if os.path.isfile(pickled):
                os.remove(pickled)
            if not checkpoint:
                what = ("the pruned model" if self.plan is not None
                        else "the model (not pruned yet: train() has not run)")
                self._narrate("Saved %s, its card and %s to %s", what, REPORT_FILE, directory)
        if self.args.push_to_hub and not _internal_call:  # as Trainer.save_model, once the directory is complete
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_record(self, checkpoint: bool) -> PruningReport:
        """The report a save carries: a checkpoint's, or the final one (speed measured)."""
        if checkpoint and self.phase is not None:
            return self.run_record(stage=f"{self.phase}-checkpoint")
        if self.speed is None and self.plan is not None and not checkpoint:
            self.measure_speed()
        return self.run_record()

    def _save_into(self, staging, record: PruningReport) -> None:
        """Write every file of a save into the (empty) ``staging`` directory."""
        with self._whole_model_outside_fsdp():  # the final model, gathered by train(): from_pretrained's files
            super().save_model(str(staging), _internal_call=True)
        # Trainer pickles its arguments; this project ships no pickles, so keep them as JSON.
        pickled = os.path.join(staging, "training_args.bin")
        if os.path.exists(pickled):
            os.remove(pickled)
        with open(os.path.join(staging, "training_args.json"), "w") as handle:
            handle.write(self.args.to_json_string())
        self.pruning_config.save_pretrained(staging)
        if self.plan is not None:
            self.plan.save_pretrained(staging)
        write_model_card(staging, record)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs) -> None:
        """Our card (compression table, per-layer widths, recipe), not transformers' generic one."""
        if not self.is_world_process_zero():
            return
        datasets = dataset_tags or dataset
        changes = {"license": license, "model_name": model_name, "base_model": finetuned_from,
                   "dataset": datasets[0] if isinstance(datasets, (list, tuple)) else datasets,
                   "repo_id": self.hub_model_id}
        changes = {key: value for key, value in changes.items() if value is not None}
        if os.path.isfile(os.path.join(self.args.output_dir, REPORT_FILE)):
            rerender_model_card(self.args.output_dir, **changes)
        else:
            write_model_card(self.args.output_dir, self.run_record(**changes))

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs):
        """Upload the compacted model, its configs, card and remote code, and nothing else.

        Trainer's own push uploads the whole output directory, including the search and
        ``finetune/`` checkpoint trees; this one uploads only the files a user of the model needs.
        """
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        return push_model_directory(self.args.output_dir, self.hub_model_id, token=token,
                                    revision=revision or self.args.hub_revision, commit_message=commit_message,
                                    private=self.args.hub_private_repo)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load checkpoint weights strictly, through ``from_pretrained``'s key conversion.

        transformers 5 saves stock ViT checkpoints under their legacy key names
        (``save_original_format=True``) while ``Trainer._load_from_checkpoint`` loads them with
        ``strict=False``: the encoder silently keeps its old weights. Loading through
        ``from_pretrained`` maps the names back, and ``strict=True`` makes any gap an error.
        """
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=next(target.parameters()).dtype)
        target.load_state_dict(loaded.state_dict(), strict=True)

    def pruning_state(self) -> PruningState:
        """What a checkpoint needs beyond the weights: the phase, the plan (while searching, what mid-search
        compactions removed), the method's tensors and the config."""
        plan = self.plan if self.plan is not None else self._search_plan
        return PruningState(self.phase or self.method.phase_name, plan, self.method.state_dict(),
                            self.pruning_config.to_dict())

    def _resolve_checkpoint(self, resume_from_checkpoint, output_dir: str) -> str | None:
        """The checkpoint to resume (see :func:`~hf_vitprune.state.resume_checkpoint`, which the CLI uses too)."""
        return resume_checkpoint(resume_from_checkpoint, output_dir, self.method.phase_name, narrate=self._narrate)

    def _check_same_config(self, saved: PruningState, checkpoint: str) -> None:
        """Refuse to continue a checkpoint written with another PruningConfig (older checkpoints store none)."""
        if saved.config is None:
            return
        differences = config_differences(saved.config, self.pruning_config.to_dict())
        if differences:
            raise ValueError(
                f"Cannot resume from {checkpoint}: it was written with another PruningConfig, and continuing it "
                f"would mix two runs. Differences: {'; '.join(differences)}. Resume with the checkpoint's config "
                f"(the 'config' entry of {os.path.join(checkpoint, STATE_JSON)}, which "
                f"PruningConfig.from_dict reads), or start the new config in a new output_dir."
            )

    def _narrate(self, message: str, *args, level: int = hf_logging.INFO) -> None:
        """Tell the user what the pruning does, once: on the main process (``args.should_log``) only."""
        if self.args.should_log:
            logger.log(level, message, *args)

    def _total_optimizer_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        batches = len(self.get_train_dataloader())
        per_epoch = max(math.ceil(batches / self.args.gradient_accumulation_steps), 1)
        return math.ceil(self.args.num_train_epochs * per_epoch)


def _constant_rate(step: int) -> float:
    """The learning-rate factor of a group kept at a constant rate (a module-level function, so that the
    scheduler's state dict holds nothing of it)."""
    return 1.0


def _training_image_size(dataset) -> tuple[int, int] | None:
    """(height, width) of the first training example's ``pixel_values``; None when it cannot be read."""
    try:
        example = dataset[0] if has_length(dataset) else next(iter(dataset))  # a stream: its first example
        pixels = example["pixel_values"]
    except Exception:  # no dataset, an empty stream, another layout: cost at config.image_size
        return None
    shape = getattr(pixels, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    return int(shape[-2]), int(shape[-1])


def _has_distillation_head(model) -> bool:
    """DeiT's two-head classifier, which returns class-token and distillation-token logits and no loss."""
    return hasattr(model, "cls_classifier") and hasattr(model, "distillation_classifier")
