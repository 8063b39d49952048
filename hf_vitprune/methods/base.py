"""The plug-in interface of a pruning method, its option dataclasses and the registry of methods.

A method is one class, registered by name with :func:`register_method`, that ``PruningTrainer``
drives through a few hooks; the trainer itself names no method:

1. :meth:`PruningMethod.search_steps` - how many of the run's optimizer steps the search takes.
2. :meth:`PruningMethod.setup` - once, on the dense model, before the search trains (ranking,
   masks, ...). It gets a :class:`SearchContext`: the model, the budget and calibration data.
3. :meth:`PruningMethod.loss_terms` - extra loss terms added in ``compute_loss`` while searching.
4. :meth:`PruningMethod.on_step_end` - per optimizer step work (a callback calls it);
   :meth:`PruningMethod.parameter_groups` - the method's own trainable tensors (architecture
   logits, ...) as optimizer parameter groups; :meth:`PruningMethod.before_optimizer_step` -
   work on their gradients (averaging them over processes: they live outside the model, so
   DDP does not).
   :meth:`PruningMethod.pending_compaction` - units to remove physically in the middle of the
   search; the trainer removes them, slices the optimizer state to match, re-wraps the model for
   DDP and calls :meth:`PruningMethod.after_compaction` (OFB's progressive shrinking).
5. :meth:`PruningMethod.state_dict` / :meth:`PruningMethod.load_state_dict` - the method's state,
   saved in every checkpoint so ``resume_from_checkpoint`` continues exactly.
6. :meth:`PruningMethod.finalize` - after the search: the :class:`~hf_vitprune.plan.PruningPlan`
   the trainer compacts the model to (then it fine-tunes the smaller model).

What the model card says about the method (:meth:`PruningMethod.card_info`) comes from the
method too. Per-method options are a dataclass (:class:`MethodOptions` subclass) set as the
method's ``options_class``; ``PruningConfig.method_options`` holds an instance of it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..budget import Budget
from ..plan import PruningPlan


def option_help(text: str, **kwargs) -> dict:
    """``field`` keywords of a documented option: ``field(default=..., **option_help("What it does."))``."""
    return {"metadata": {"help": text}, **kwargs}


@dataclass
class MethodOptions:
    """Base of the per-method option dataclasses: every field has ``metadata={"help": ...}``.

    Subclasses validate in ``__post_init__`` (call ``super().__post_init__()``); the helpers below
    give errors that name the field, the value and the fix.
    """

    def __post_init__(self):
        pass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], method: str) -> MethodOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Method {method!r} has no option(s) {unknown}; its options are {sorted(known)}. "
                f"{_who_has(unknown)}"
            )
        return cls(**data)

    # ------------------------------------------------------------------ validation helpers

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{type(self).__name__}.{name}={value!r} must be an integer >= {minimum}.")

    def _check_number(self, name: str, *, low: float | None = None, high: float | None = None,
                      low_open: bool = True, high_open: bool = True) -> None:
        value = getattr(self, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            left = "" if low is None else f"{'>' if low_open else '>='} {low}"
            right = "" if high is None else f"{'<' if high_open else '<='} {high}"
            bounds = " and ".join(part for part in (left, right) if part)
            raise ValueError(f"{type(self).__name__}.{name}={value!r} must be a finite number {bounds}.")


@dataclass
class SearchContext:
    """What a method may use while it sets up its search on the dense model.

    ``calibration_batches()`` yields this process's share of the calibration images as model
    inputs on the right device; statistics computed from them must be summed over processes
    before they decide anything, so every process derives the same masks.
    """

    model: nn.Module
    budget: Budget
    search_steps: int
    calibration_batches: Callable[[], Iterable[dict[str, Any]]]
    seed: int = 0


class PruningMethod:
    """Base class of the pruning methods; subclass it and decorate with :func:`register_method`."""

    name: ClassVar[str] = ""
    options_class: ClassVar[type[MethodOptions]] = MethodOptions
    phase_name: ClassVar[str] = "search"  # names the search phase's checkpoint folder and logs
    budgets: ClassVar[tuple[str, ...]] = ("params", "flops")  # the Budget metrics it can meet
    description: ClassVar[str] = ""  # one sentence for the model card
    # whether its hooks work on FSDP2-sharded (DTensor) parameters: see hf_vitprune.sharding
    supports_sharded_parameters: ClassVar[bool] = False

    def __init__(self, config):
        self.config = config
        self.options = config.method_options
        # the frozen dense model when PruningConfig.distillation_weight > 0 (the trainer sets it), for methods
        # that distil during their search
        self.teacher: nn.Module | None = None

    # ------------------------------------------------------------------ the hooks

    def search_steps(self, total_steps: int) -> int:
        """Optimizer steps of the search phase, out of ``total_steps`` (the rest fine-tune)."""
        raise NotImplementedError

    def setup(self, context: SearchContext) -> None:
        """Prepare the search on the dense model (ranking, masks, ...); called once, not on resume."""

    def loss_terms(self, model: nn.Module, inputs: dict, outputs: Any) -> dict[str, torch.Tensor]:
        """Extra loss terms (name -> scalar) added to the training loss during the search."""
        return {}

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Per-step work of the search, after optimizer step ``step`` (1-based, of the search phase)."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (``{"params": [...], "lr": ..., ...}``) of the method's own trainable
        tensors, added to the search phase's optimizer after the model's groups; the trainer clears their
        gradients after every optimizer step, as it does the model's. A group with ``"lr_schedule": "constant"``
        keeps its learning rate through the search; the others follow the Trainer's schedule."""
        return []

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Called on every process right before each optimizer step of the search."""

    def pending_compaction(self) -> PruningPlan | None:
        """Units to remove physically now, mid-search (indices into the model as it is), or None.

        Asked on every process after each :meth:`on_step_end`; it must give the same answer on all of
        them. The trainer then compacts the model, slices the optimizer state alike, and calls
        :meth:`after_compaction`. Checkpoints record the compaction, so a resumed run replays it.
        """
        return None

    def after_compaction(self, model: nn.Module, plan: PruningPlan,
                         replace_parameters: Callable[[Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], None]
                         ) -> None:
        """Called after the trainer removed ``plan``'s units mid-search: slice the method's own tensors to match
        and re-attach what was hooked on replaced modules. ``replace_parameters([(old, new, index), ...])``
        moves the optimizer from ``old`` to ``new`` with its state sliced by ``index`` (the flat positions in
        ``old`` of ``new``'s elements, see :func:`hf_vitprune.optimizer_state.replace_parameters`)."""

    def finalize(self, model: nn.Module) -> PruningPlan:
        """End the search: leave ``model`` ready to compact and return the plan to compact it to (indices into
        the model as it is then, mid-search compactions included)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's search state as tensors (saved with safetensors in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        """Restore :meth:`state_dict` output when a run resumes (``model`` is the dense model, or in the search
        phase the model as the checkpoint's mid-search compactions left it)."""

    def distils_during_search(self) -> bool:
        """Whether the trainer adds its distillation loss from the dense model in the search phase too (it always
        does while fine-tuning, when ``PruningConfig.distillation_weight > 0``)."""
        return False

    def search_lr_scheduler(self) -> str | None:
        """A ``transformers.get_scheduler`` name for the search phase, or None for ``args.lr_scheduler_type``."""
        return None

    def log_values(self) -> dict[str, float]:
        """Figures added to every Trainer log while this method's state exists (residuals, ...)."""
        return {}

    # ------------------------------------------------------------------ the model card

    def card_recipe(self) -> list[str]:
        """Sentences for the card's recipe that only this method can write (its schedule, its ranking)."""
        return []

    def citations(self) -> list[dict[str, str]]:
        """``{"what": ..., "bibtex": ...}`` entries the card cites for this method."""
        return []

    def card_info(self) -> dict:
        """Everything the card says about the method, as plain JSON (stored in pruning_report.json)."""
        return {"description": self.description or self.name, "recipe": self.card_recipe(),
                "citations": self.citations()}


def average_over_processes(parameters: Iterable[nn.Parameter], buffers: Iterable[torch.Tensor] = ()) -> None:
    """Average the gradients of a method's own ``parameters`` (and the values of ``buffers``) over the processes.

    A method's tensors live outside the model, so DDP does not average them; call this in
    :meth:`PruningMethod.before_optimizer_step`. Every process joins every all-reduce, gradient or not.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        torch.distributed.all_reduce(parameter.grad)
        parameter.grad /= world
    for buffer in buffers:
        if buffer.is_floating_point():
            torch.distributed.all_reduce(buffer)
            buffer /= world


# --------------------------------------------------------------------------- the registry

METHODS: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available as ``PruningConfig(method=cls.name)``."""
    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
        raise TypeError(f"register_method takes a PruningMethod subclass, got {cls!r}.")
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"{cls.__name__}.name={cls.name!r} must be a non-empty identifier such as 'gohsp'.")
    if not (isinstance(cls.options_class, type) and issubclass(cls.options_class, MethodOptions)
            and dataclasses.is_dataclass(cls.options_class)):
        raise TypeError(f"{cls.__name__}.options_class must be a MethodOptions dataclass.")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", cls.phase_name) or cls.phase_name == "finetune":
        raise ValueError(
            f"{cls.__name__}.phase_name={cls.phase_name!r} must be a lowercase identifier other than 'finetune' "
            f"(it names checkpoint folders and report stages)."
        )
    METHODS[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a registered method (tests register toy methods and clean up after themselves)."""
    METHODS.pop(name, None)


def get_method(name: str) -> type[PruningMethod]:
    """The method class registered as ``name``, or a ValueError listing the registered names."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"method={name!r} is unknown; choose one of {', '.join(sorted(METHODS))} (or register a new one "
            f"with hf_vitprune.methods.register_method)."
        ) from None


def _who_has(options: list[str]) -> str:
    owners = {
        option: sorted(name for name, cls in METHODS.items()
                       if option in {f.name for f in dataclasses.fields(cls.options_class)})
        for option in options
    }
    parts = [f"{option} belongs to {', '.join(names)}" for option, names in owners.items() if names]
    return ("(" + "; ".join(parts) + ".)") if parts else ""
