"""PruningTrainer: one ``train()`` ranks units, runs ADMM, compacts the model and fine-tunes it.

Phases (each one ordinary ``Trainer.train()`` call, so every TrainingArguments feature keeps working):

1. *Ranking*: the criterion (``PruningConfig.method``) scores heads and MLP neurons on a
   calibration slice of the training set, sharded across processes and summed, so every rank
   derives the same scores.
2. *ADMM* (``admm_fraction`` of the steps, checkpoints under ``output_dir/admm``): the shapes stay
   fixed; ``compute_loss`` adds rho/2 ||W - Z + U||^2 and :class:`ADMMCallback` projects W + U onto
   the budget every ``admm_update_steps`` steps (Z/U updates, rho growth).
3. *Compaction*: W is hard-pruned to Z's support, then ``apply_plan`` removes the units for real.
4. *Fine-tuning* (the remaining steps, under ``output_dir/finetune``): the smaller model trains
   with a fresh optimizer and scheduler, distilling from a frozen copy of the dense model; then
   it is evaluated.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint, set_seed

from .admm import ADMMState, combine_scores
from .architectures import family_of, find_encoder_layers, num_tokens
from .budget import select_plan
from .card import push_model_directory, rerender_model_card, write_trainer_card
from .config import PruningConfig
from .distillation import classification_logits, distillation_loss
from .importance import ImportanceOptions, UnitScores, get_criterion
from .plan import PruningPlan
from .report import REPORT_FILE
from .state import PruningState
from .stats import layer_cost, model_stats
from .surgery import apply_plan

IMPORTANCE_PREFIX = "importance."
ADMM_PREFIX = "admm."


class ADMMCallback(TrainerCallback):
    """Z/U updates and rho growth every ``admm_update_steps`` optimizer steps of the ADMM phase."""

    def __init__(self, trainer: PruningTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.phase == "admm" and state.global_step % trainer.pruning_config.admm_update_steps == 0:
            trainer.admm_update()


class PruningStateCallback(TrainerCallback):
    """Writes the pruning state into every checkpoint the Trainer saves (main process only)."""

    def __init__(self, trainer: PruningTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.trainer.pruning_state().save(checkpoint)


class PruningTrainer(Trainer):
    """A ``Trainer`` that returns a structurally pruned, compacted, fine-tuned model.

    Takes ``pruning_config=`` beside the usual Trainer arguments. After ``train()``,
    ``self.model`` is the smaller dense model, ``self.plan`` says what was kept (indices into
    the original model), and ``save_model()`` writes the model, ``pruning_config.json`` and
    ``pruning_plan.json``.
    """

    # compute_loss returns a per-batch mean; Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, pruning_config: PruningConfig, **kwargs):
        if not isinstance(pruning_config, PruningConfig):
            raise TypeError(f"pruning_config must be a PruningConfig, got {type(pruning_config).__name__}.")
        super().__init__(*args, **kwargs)
        family_of(self.model)  # unsupported models fail here, before any work
        find_encoder_layers(self.model)
        self.pruning_config = pruning_config
        self.phase: str | None = None
        self.plan: PruningPlan | None = None
        self.importance: UnitScores | None = None
        self.admm: ADMMState | None = None
        self.dense_stats = model_stats(self.model)
        self.base_model_name = getattr(self.model.config, "name_or_path", None) or None
        self.dense_metrics: dict[str, float] | None = None  # set by callers that evaluate the dense model
        self.measured_speed: dict | None = None  # set by callers that time the models; else save_model does
        self.teacher = None
        if pruning_config.distillation_weight > 0:
            self.teacher = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval().requires_grad_(False)
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._latest: dict[str, float] = {}
        self.add_callback(ADMMCallback(self))
        self.add_callback(PruningStateCallback(self))

    # ------------------------------------------------------------------ the pipeline

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        base_output_dir, base_max_steps = self.args.output_dir, self.args.max_steps
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint, base_output_dir)
        saved = PruningState.load(checkpoint) if checkpoint else None
        total = self._total_optimizer_steps()
        if total < 2:
            raise ValueError(
                f"PruningTrainer needs at least 2 optimizer steps (ADMM, then fine-tuning); the arguments give {total}. "
                f"Raise num_train_epochs or max_steps."
            )
        admm_steps = min(max(1, round(total * self.pruning_config.admm_fraction)), total - 1)
        admm_history: list[dict] = []
        try:
            if saved is None or saved.phase == "admm":
                self._run_admm(admm_steps, base_output_dir, checkpoint if saved else None, saved, trial, **kwargs)
                admm_history = list(self.state.log_history)
                checkpoint = None
            else:
                self._restore_compacted(saved)
            output = self._run_finetune(total - admm_steps, base_output_dir, checkpoint, trial, **kwargs)
            # each phase is its own Trainer run with a fresh state: keep the ADMM phase's logs too
            self.state.log_history = admm_history + self.state.log_history
        finally:
            self.args.output_dir, self.args.max_steps = base_output_dir, base_max_steps
        if self.eval_dataset is not None:
            output.metrics.update(self.evaluate())
        return output

    def _run_admm(self, steps, base_output_dir, checkpoint, saved, trial, **kwargs):
        self.phase = "admm"
        if saved is not None:
            self._load_tensors(saved)
        else:
            set_seed(self.args.seed)
            started = time.perf_counter()
            self.importance = self._rank_units()
            self._latest["ranking_seconds"] = time.perf_counter() - started
            self._start_admm(steps)
        self.args.output_dir, self.args.max_steps = os.path.join(base_output_dir, "admm"), steps
        super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        self.plan = self._project(model)  # Z's support after the last W-step
        self.admm.hard_prune(model, self.plan)
        self._compact(self.plan)

    def _run_finetune(self, steps, base_output_dir, checkpoint, trial, **kwargs):
        self.phase = "finetune"
        self.optimizer, self.lr_scheduler = None, None  # fresh for the compacted parameters
        self.model_wrapped = self.model
        if checkpoint is None:
            set_seed(self.args.seed)
        self.args.output_dir, self.args.max_steps = os.path.join(base_output_dir, "finetune"), steps
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)

    def _compact(self, plan: PruningPlan) -> None:
        model = self.accelerator.unwrap_model(self.model)
        apply_plan(model, plan)
        self.model = self.model_wrapped = model
        stats = model_stats(model)
        self._record_size(stats)
        self._latest.update(params_ratio=stats.params / self.dense_stats.params,
                            flops_ratio=stats.flops / self.dense_stats.flops)

    def _record_size(self, stats) -> None:
        """Log what a model (or a plan's prediction) keeps: heads, neurons, params, FLOPs."""
        self._latest.update(
            kept_heads=sum(layer.heads for layer in stats.layers),
            kept_neurons=sum(layer.neurons for layer in stats.layers),
            params=stats.params,
            flops=stats.flops,
        )

    def _restore_compacted(self, saved: PruningState) -> None:
        if saved.plan is None:
            raise ValueError("The fine-tuning checkpoint carries no pruning plan; it was not written by PruningTrainer.")
        self._load_tensors(saved)
        self.plan = saved.plan
        self._compact(saved.plan)

    # ------------------------------------------------------------------ ranking and ADMM

    def _rank_units(self) -> UnitScores:
        config = self.pruning_config
        criterion = get_criterion(config.method)
        options = ImportanceOptions(
            damping=config.damping,
            tolerance=config.ranking_tolerance,
            max_iterations=config.ranking_max_iterations,
            edge_statistic=config.edge_statistic,
            seed=config.random_seed,
        )
        model = self.accelerator.unwrap_model(self.model)
        return criterion(model, self._calibration_batches(), options=options)

    def _calibration_batches(self):
        """This process's share of the first ``calibration_samples`` training examples, in order."""
        dataset = self.train_dataset
        if dataset is None or len(dataset) == 0:
            raise ValueError("The calibration set is empty: PruningTrainer needs a non-empty train_dataset.")
        count = min(self.pruning_config.calibration_samples, len(dataset))
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        indices = range(rank, count, world)
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: select, and drop what the model does not take
            subset = self._remove_unused_columns(dataset.select(indices), description="calibration")
        else:
            subset = torch.utils.data.Subset(dataset, list(indices))
        loader = torch.utils.data.DataLoader(
            subset, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator
        )
        for batch in loader:
            yield self._prepare_inputs(batch)

    def _project(self, model) -> PruningPlan:
        config = self.pruning_config
        head_norms, neuron_norms = self.admm.group_norms(model)
        heads, neurons = projection_scores(config.method, self.importance, head_norms, neuron_norms, config.importance_alpha)
        heads, neurons = balance_kinds(model, heads, neurons, flops=config.target_flops_reduction is not None)
        return select_plan(
            model,
            heads,
            neurons,
            target_sparsity=config.target_sparsity,
            target_flops_reduction=config.target_flops_reduction,
            min_heads_per_layer=config.min_heads_per_layer,
            min_neurons_per_layer=config.min_neurons_per_layer,
            round_heads_to=config.round_heads_to,
            round_neurons_to=config.round_neurons_to,
            prune_heads=config.prune_heads,
            prune_neurons=config.prune_neurons,
        )

    def _start_admm(self, steps: int) -> None:
        """Standard ADMM start: U = 0 and Z = the projection of the dense W onto the budget."""
        model = self.accelerator.unwrap_model(self.model)
        config = self.pruning_config
        growth = self._rho_growth(steps)
        self.admm = ADMMState.initialize(model, config.admm_rho, rho_growth=growth)
        plan = self._project(model)
        self.admm = ADMMState.initialize(model, config.admm_rho, rho_growth=growth, plan=plan)
        self._log_plan(model, plan)

    def _rho_growth(self, steps: int) -> float:
        """admm_rho_growth, or the growth that takes rho to admm_rho_final at the phase's last Z/U update."""
        config = self.pruning_config
        if config.admm_rho_final is None:
            return config.admm_rho_growth
        updates = steps // config.admm_update_steps
        if updates == 0:
            return 1.0
        return (config.admm_rho_final / config.admm_rho) ** (1.0 / updates)

    def admm_update(self) -> None:
        """Z = projection of W + U onto the budget, U += W - Z, rho grows; logs the residual and the plan."""
        model = self.accelerator.unwrap_model(self.model)
        plan = self._project(model)
        self.admm.update(model, plan)
        self._log_plan(model, plan)

    def _log_plan(self, model, plan: PruningPlan) -> None:
        self._record_size(model_stats(model, plan))
        self._latest.update(admm_residual=float(self.admm.residual(model)), admm_rho=float(self.admm.rho))

    # ------------------------------------------------------------------ loss and logging

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Label loss (+ distillation while fine-tuning) (+ ADMM penalty during ADMM), per-batch mean."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("PruningTrainer needs `labels` in every training batch.")
        outputs = model(**inputs)
        logits, distil_logits = classification_logits(outputs)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.args.label_smoothing_factor)
        self._metrics["label_loss"].append(loss.detach())
        weight = self.pruning_config.distillation_weight
        if self.phase == "finetune" and self.teacher is not None and model.training:
            teacher = self.teacher.to(logits.device)
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits
            if not self.pruning_config.use_distillation_token:
                distil_logits = logits
            kd = distillation_loss(distil_logits, teacher_logits, self.pruning_config.distillation_temperature)
            self._metrics["distillation_loss"].append(kd.detach())
            loss = (1 - weight) * loss + weight * kd
        if self.phase == "admm" and model.training:
            penalty = self.admm.penalty(self.accelerator.unwrap_model(model))
            self._metrics["admm_penalty"].append(penalty.detach())
            loss = loss + penalty
        if model.training:
            self._check_finite(loss)
        return (loss, outputs) if return_outputs else loss

    def _check_finite(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite, reduction="sum") / self.accelerator.num_processes
        if finite.item() < 1:
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise FloatingPointError(
                f"The training loss became {loss.item()} at step {self.state.global_step} of the {self.phase} phase. "
                f"Lower the learning rate or admm_rho, or check the data. Nothing was saved after the failure; "
                f"the last good checkpoint is {last or 'none (none was saved yet)'}."
            )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the pruning metrics (averaged over steps and processes) to every Trainer log."""
        for key, values in self._metrics.items():
            if values:
                mean = torch.stack(values).mean().reshape(1)
                logs[key] = self.accelerator.gather(mean).mean().item()
        self._metrics.clear()
        if self.phase is not None:
            logs.update({key: value for key, value in self._latest.items()})
            logs["phase_admm"] = 1.0 if self.phase == "admm" else 0.0
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving and resuming

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the (compacted) model, ``pruning_config.json`` and ``pruning_plan.json``."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            directory = output_dir or self.args.output_dir
            # Trainer pickles its arguments; this project ships no pickles, so keep them as JSON.
            pickled = os.path.join(directory, "training_args.bin")
            if os.path.exists(pickled):
                os.remove(pickled)
            with open(os.path.join(directory, "training_args.json"), "w") as handle:
                handle.write(self.args.to_json_string())
            self.pruning_config.save_pretrained(directory)
            if self.plan is not None:
                self.plan.save_pretrained(directory)
            fields = {"speed": self.measured_speed} if self.measured_speed is not None else {}
            write_trainer_card(self, directory, **fields)

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
            write_trainer_card(self, self.args.output_dir, speed=None, **changes)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, **kwargs):
        """Upload the compacted model, its configs, card and remote code, and nothing else.

        Trainer's own push uploads the whole output directory, including the ``admm/`` and
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
        tensors = {}
        if self.importance is not None:
            tensors.update(scores_to_tensors(self.importance, IMPORTANCE_PREFIX))
        if self.admm is not None and self.phase == "admm":
            tensors.update({f"{ADMM_PREFIX}{k}": v for k, v in self.admm.state_dict().items()})
        return PruningState(self.phase or "admm", self.plan, tensors)

    def _load_tensors(self, saved: PruningState) -> None:
        self.importance = scores_from_tensors(saved.tensors, IMPORTANCE_PREFIX)
        admm = {k[len(ADMM_PREFIX):]: v for k, v in saved.tensors.items() if k.startswith(ADMM_PREFIX)}
        if admm:
            self.admm = ADMMState.from_state_dict(admm, model=self.accelerator.unwrap_model(self.model))

    @staticmethod
    def _resolve_checkpoint(resume_from_checkpoint, output_dir: str) -> str | None:
        if not resume_from_checkpoint:
            return None
        if resume_from_checkpoint is True:
            for phase in ("finetune", "admm"):
                folder = os.path.join(output_dir, phase)
                last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
                if last is not None:
                    return last
            raise ValueError(f"No PruningTrainer checkpoint found under {output_dir}/finetune or {output_dir}/admm.")
        PruningState.load(resume_from_checkpoint)  # clear error if it is not ours
        return str(resume_from_checkpoint)

    def _total_optimizer_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        batches = len(self.get_train_dataloader())
        per_epoch = max(math.ceil(batches / self.args.gradient_accumulation_steps), 1)
        return math.ceil(self.args.num_train_epochs * per_epoch)


def projection_scores(method, importance: UnitScores, head_norms, neuron_norms, alpha: float):
    """Scores that decide which units Z keeps at each projection.

    - gohsp: heads by graph importance**alpha x normalised group norm of W + U (the paper's soft
      guideline); neurons by the group norm (the Euclidean projection).
    - magnitude: both by the group norm of W + U (plain ADMM projection).
    - taylor: both by Taylor importance**alpha x normalised group norm.
    - random: the fixed random scores, so the baseline is random however training moves W.
    """
    if method == "magnitude":
        return head_norms, neuron_norms
    if method == "random":
        return importance.heads, importance.neurons
    heads = combine_scores(importance.heads, head_norms, alpha)
    neurons = neuron_norms if method == "gohsp" else combine_scores(importance.neurons, neuron_norms, alpha)
    return heads, neurons


def balance_kinds(model, head_scores, neuron_scores, flops: bool):
    """Put head and neuron scores on one scale before the budgeted selection compares them.

    Criteria score heads and neurons in unrelated units (a stationary probability against a
    squared norm), so each kind is rescaled to total score = total cost of that kind: a unit of
    average importance then has score-per-cost 1 whichever kind it is, and the selection trades
    heads against neurons by relative importance only.
    """
    tokens = num_tokens(model)
    costs = [layer_cost(layer, tokens) for layer in find_encoder_layers(model)]

    def rescale(scores, unit_cost):
        if scores is None:
            return None
        total_cost = sum(unit_cost(c) * s.numel() for c, s in zip(costs, scores))
        total_score = float(sum(s.double().sum() for s in scores))
        return [s * (total_cost / total_score) if total_score > 0 else s for s in scores]

    head_cost = (lambda c: c.flops_per_head) if flops else (lambda c: c.params_per_head)
    neuron_cost = (lambda c: c.flops_per_neuron) if flops else (lambda c: c.params_per_neuron)
    return rescale(head_scores, head_cost), rescale(neuron_scores, neuron_cost)


def scores_to_tensors(scores: UnitScores, prefix: str) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}heads.{i}": t for i, t in enumerate(scores.heads)}
    tensors.update({f"{prefix}neurons.{i}": t for i, t in enumerate(scores.neurons)})
    return tensors


def scores_from_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> UnitScores | None:
    def layer_list(kind: str) -> list[torch.Tensor]:
        found = {int(k.rsplit(".", 1)[1]): v for k, v in tensors.items() if k.startswith(f"{prefix}{kind}.")}
        return [found[i] for i in range(len(found))]

    heads = layer_list("heads")
    return UnitScores(heads, layer_list("neurons")) if heads else None
