"""SPViT soft token pruning (Kong et al., ECCV 2022) as a method: train token selectors with the model.

The method gives the model a token path (:mod:`hf_vitprune.tokens`) and trains it in two parts:

1. *Selection* (``search_fraction`` of the steps): decisions are sampled (binary Gumbel-softmax,
   straight-through), and the loss adds ``keep_rate_weight`` x the squared gap between each stage's
   mean kept share and its keep ratio, and - when ``PruningConfig.distillation_weight`` > 0 -
   ``token_distillation_weight`` x (the soft-logit distillation from the dense model + the mean
   squared error between the last layer's features of the kept tokens and the dense model's at the
   same positions).
2. *Fine-tuning*: decisions are the inference ones (top-k per stage), so the model trains on what
   it will run; the trainer's usual distillation applies. No structural unit is removed.

Keep ratios follow DynamicViT/SPViT's shape, ``rho, rho**2, rho**3, ...`` over the stages, with
``rho`` the largest one whose cost meets the budget: the FLOPs (``model_stats``, selectors included)
for ``target_flops_reduction``, or for ``target_latency_reduction`` the latency predicted from a
table of the model's layers timed at a grid of token counts on this machine
(:func:`hf_vitprune.speed.layer_latency_table`). A model already pruned structurally is budgeted
from its own cost; ``keep_ratios`` may be given instead. Departures (docs/methods.md): the paper
picks each stage's ratio from its latency table, here it sets the one ``rho``; the package token
passes no gradient to the selectors.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..architectures import embedding_width, find_encoder_layers, meta_copy, num_patches, num_tokens
from ..budget import Budget
from ..distillation import classification_logits, distillation_loss
from ..plan import PruningPlan
from ..speed import layer_latency_table, measured_latency_ratio
from ..stats import model_stats
from ..surgery import add_token_pruning
from ..tokens import (
    TokenSelector,
    TokenStages,
    check_token_family,
    default_depths,
    drop_tokens,
    stages_for,
    token_pruning_of,
)
from .base import MethodOptions, PruningMethod, SearchContext, register_method
from .base import option_help as _help  # every option documents itself

logger = logging.getLogger(__name__)

SPVIT_CITATION = {
    "what": "SPViT soft token pruning (Kong et al., ECCV 2022, arXiv:2112.13890)",
    "bibtex": """@inproceedings{kong2022spvit,
  title = {SPViT: Enabling Faster Vision Transformers via Latency-aware Soft Token Pruning},
  author = {Kong, Zhenglun and Dong, Peiyan and Ma, Xiaolong and Meng, Xin and Niu, Wei and Sun, Mengshu and Shen, Xuan and Yuan, Geng and Ren, Bin and Tang, Hao and Qin, Minghai and Wang, Yanzhi},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year = {2022},
  eprint = {2112.13890},
  archivePrefix = {arXiv}
}""",
}
PREFIX = "spvit_tokens."




@dataclass
class TokenPruningOptions(MethodOptions):
    """Where tokens are dropped, how many stay, and how the selectors train."""

    num_stages: int = field(
        default=3, **_help("Token selection stages, spread over the depth (3, 6, 9 of 12 layers; fewer if the model is "
                           "too shallow for them to differ).")
    )
    stage_depths: list[int] | None = field(
        default=None, **_help("Encoder layers the stages run before (0-based); default: spread over the depth.")
    )
    keep_ratios: list[float] | None = field(
        default=None, **_help("Share of the image's patch tokens each stage keeps; default: rho, rho^2, ... chosen "
                              "to meet target_flops_reduction. Given, they must remove at least the target (else an "
                              "error, before training).")
    )
    selector_width: int | None = field(
        default=None, **_help("Features per head in each selector; default: a quarter of the head dim (at least 4).")
    )
    search_fraction: float = field(
        default=0.5, **_help("Share of the steps with sampled decisions and the keep-rate loss; the rest fine-tunes "
                             "on the inference decisions.")
    )
    keep_rate_weight: float = field(default=2.0, **_help("Weight of the keep-rate loss (paper: 2)."))
    token_distillation_weight: float = field(
        default=0.5, **_help("Weight of the distillation from the dense model while selecting (logits and kept-token "
                             "features; paper: 0.5); needs PruningConfig.distillation_weight > 0.")
    )
    temperature: float = field(default=1.0, **_help("Temperature of the Gumbel-softmax decisions."))
    latency_batch_size: int = field(
        default=1, **_help("With target_latency_reduction: the batch size the latency table is measured at (the one "
                           "the model will run at: a stage's own cost weighs most at batch 1).")
    )
    latency_repeats: int = field(default=5, **_help("With target_latency_reduction: timed runs per table entry."))
    latency_calibrations: int = field(
        default=3, **_help("With target_latency_reduction: rounds that time the token-pruned model whole beside the "
                           "dense one and, where it falls short of the budget, ask the table for more (0: trust it).")
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_int("num_stages", 1)
        if self.selector_width is not None:
            self._check_int("selector_width", 1)
        self._check_number("search_fraction", low=0, high=1)
        for name in ("keep_rate_weight", "token_distillation_weight"):
            self._check_number(name, low=0, low_open=False)
        self._check_number("temperature", low=0)
        self._check_int("latency_batch_size", 1)
        self._check_int("latency_repeats", 1)
        self._check_int("latency_calibrations", 0)
        if self.keep_ratios is not None:
            TokenStages(tuple(range(len(self.keep_ratios))), tuple(self.keep_ratios), 1)  # validates the ratios
        if self.stage_depths is not None and self.keep_ratios is not None and len(self.stage_depths) != len(
                self.keep_ratios):
            raise ValueError(f"TokenPruningOptions has {len(self.stage_depths)} stage_depths but "
                             f"{len(self.keep_ratios)} keep_ratios; give one keep ratio per stage.")


@register_method
class SPViTTokens(PruningMethod):
    name = "spvit_tokens"
    options_class = TokenPruningOptions
    phase_name = "token_search"
    budgets = ("flops", "latency")
    description = ("SPViT soft token pruning: learned selectors drop patch tokens at a few depths and fold them into "
                   "a package token; the later layers run on fewer tokens.")

    def __init__(self, config):
        super().__init__(config)
        _check_ratios_can_meet(config)
        self.stages: TokenStages | None = None
        self.searching = True
        self.latency_table: dict | None = None  # with a latency budget: what the keep ratios were read from
        self._features: dict[str, torch.Tensor] = {}
        self._handles = []
        self._kept_shares: dict[int, list[float]] = {}  # per stage, the sampled kept share of each step since the last log

    def search_steps(self, total_steps: int) -> int:
        return min(max(1, round(total_steps * self.options.search_fraction)), total_steps - 1)

    # ------------------------------------------------------------------ setup

    def setup(self, context: SearchContext) -> None:
        model, budget = context.model, context.budget
        check_token_family(model)
        o = self.options
        if o.keep_ratios is not None:
            stages = stages_for(model, o.keep_ratios, o.stage_depths, o.selector_width)
            self._check_ratios_meet(model, budget, stages)
            self.stages = stages
        else:
            self.stages = self._choose_stages(model, budget)
            if budget.metric == "latency":
                self.stages = self._calibrated(model, budget, self.stages)
        self._build(model)

    def _costing(self, model: nn.Module, budget):
        """(dense cost, unit, cost of keep ratios at depths) for the budget's metric: FLOPs counted, or the latency
        predicted from a table of this model's layers measured on this machine."""
        o = self.options
        if budget.metric == "latency":
            if self.latency_table is None:  # timed once; a calibration round asks it again
                self.latency_table = layer_latency_table(model, _token_grid(model), batch_size=o.latency_batch_size,
                                                         repeats=o.latency_repeats, stage=_timed_stage(model, o))

            def cost(ratios, depths) -> float:
                shaped = add_token_pruning(meta_copy(model), ratios, depths, o.selector_width)
                return predicted_latency_ms(self.latency_table, token_pruning_of(shaped), num_tokens(model))
            return self.latency_table["model_ms"], "ms", cost

        def cost(ratios, depths) -> float:
            return model_stats(add_token_pruning(meta_copy(model), ratios, depths, o.selector_width)).flops
        return model_stats(model).flops, "FLOPs per image", cost

    def _calibrated(self, model: nn.Module, budget, stages: TokenStages) -> TokenStages:
        """``stages`` chosen again until the token-pruned model, timed whole beside the dense one, meets the budget.

        The table times each layer and a stage alone; inside the model a layer also runs the stages' hooks and
        the attention dispatch, so at the DeiT-Tiny shape a 30% budget measured 19.8%. Each round times the model
        with the stages (untrained selectors cost what trained ones cost) and asks the table for as much more
        reduction as the measurement fell short, up to ``latency_calibrations`` rounds.
        """
        o = self.options
        if o.latency_calibrations == 0:
            return stages
        ask = budget.fraction
        for round_ in range(o.latency_calibrations + 1):
            shaped = add_token_pruning(copy.deepcopy(model), stages.keep_ratios, stages.depths, stages.selector_width)
            measured = 1 - measured_latency_ratio(shaped, model, o.latency_batch_size, o.latency_repeats)
            if measured >= budget.fraction or round_ == o.latency_calibrations:
                break
            gap = budget.fraction - measured
            try:
                chosen = stages
                while chosen == stages:  # a gap smaller than one token's worth: ask until the tokens change
                    ask += gap
                    if ask >= 1:
                        raise ValueError("nothing left to ask the table for")
                    chosen = self._choose_stages(model, Budget("latency", ask))
                    gap = max(gap, 0.01)
                stages = chosen
            except ValueError:  # the table cannot give that much: keep the closest stages
                break
        if measured < budget.fraction:
            logger.warning("spvit_tokens: the token-pruned model measured %.1f%% less latency than dense at batch %d, "
                           "short of the %.0f%% asked; the keep ratios are the table's best. Ask for less, or prune "
                           "heads and neurons too.", 100 * measured, o.latency_batch_size, 100 * budget.fraction)
        return stages

    def _check_ratios_meet(self, model: nn.Module, budget, stages: TokenStages) -> None:
        """Refuse explicit keep_ratios that remove less than the budget asks: the run would end short of the target
        it was given without a word (the budget only chooses the ratios when keep_ratios is not given)."""
        dense, unit, cost = self._costing(model, budget)
        kept = cost(stages.keep_ratios, stages.depths)
        if kept <= (1 - budget.fraction) * dense:
            return
        raise ValueError(
            f"keep_ratios={list(self.options.keep_ratios)} remove {1 - kept / dense:.1%} of the {budget.unit_name} "
            f"({kept:,.2f} of {dense:,.2f} {unit} left), but {budget.target_name}={budget.fraction:g} asks to remove "
            f"{budget.fraction:.0%}. {_RATIOS_FIX.format(target=budget.target_name)}"
        )

    def _choose_stages(self, model: nn.Module, budget) -> TokenStages:
        """Keep ratios rho, rho^2, ... with the largest rho whose cost meets the budget.

        With a latency budget and the default depths, each stage must also pay for itself: a stage whose own
        measured time exceeds what the layers after it save (the prediction without it minus with it, at the same
        ratios) is left out, the one that gains least first, and rho is chosen again for the others (at batch 1 a
        stage can cost more than the tokens it drops save). Where even one token per stage misses the budget, the
        stage whose removal lowers that floor most goes first.
        """
        o = self.options
        # num_stages spread over the depth; a shallow model gets as many distinct depths as it has
        depths = list(o.stage_depths or default_depths(len(find_encoder_layers(model)), o.num_stages))
        dense, unit, cost_of = self._costing(model, budget)
        target = (1 - budget.fraction) * dense
        placing = budget.metric == "latency" and o.stage_depths is None
        while True:
            ratios = self._largest_ratios(model, depths, cost_of, target)
            if ratios is None:
                fewest = cost_of([1e-9] * len(depths), depths)
                if placing and len(depths) > 1:  # the stages' own time may be what keeps even that above the budget
                    floors = [cost_of([1e-9] * (len(depths) - 1), depths[:s] + depths[s + 1:])
                              for s in range(len(depths))]
                    lowest = min(range(len(depths)), key=lambda s: (floors[s], s))
                    if floors[lowest] < fewest:
                        del depths[lowest]
                        continue
                raise ValueError(
                    f"{budget.target_name}={budget.fraction:g} asks for at most {target:,.2f} {unit} (of "
                    f"{dense:,.2f}), but keeping one token per stage at these depths still costs {fewest:,.2f}. Ask "
                    f"for a smaller reduction, move the stages earlier (stage_depths), or prune the model's heads and "
                    f"neurons first."
                )
            if not placing or len(depths) == 1:
                return stages_for(model, ratios, depths, o.selector_width)
            cost = cost_of(ratios, depths)
            gains = [cost_of(ratios[:s] + ratios[s + 1:], depths[:s] + depths[s + 1:]) - cost
                     for s in range(len(depths))]
            worst = min(range(len(depths)), key=lambda s: (gains[s], s))
            if gains[worst] > 0:
                return stages_for(model, ratios, depths, o.selector_width)
            del depths[worst]

    @staticmethod
    def _largest_ratios(model: nn.Module, depths: list[int], cost_of, target: float) -> list[float] | None:
        """rho, rho^2, ... at ``depths`` with the largest rho whose cost meets ``target``, as shares of whole
        tokens (so rounding cannot overshoot); None when even one token per stage costs more."""
        count = len(depths)

        def cost(rho: float) -> float:
            return cost_of([rho ** (s + 1) for s in range(count)], depths)

        if cost(1e-9) > target:
            return None
        low, high = 0.0, 1.0  # the cost grows with rho; keep the largest rho that meets the target
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if cost(middle) <= target else (low, middle)
        patches = num_patches(model)
        counts = TokenStages(tuple(range(count)), tuple(low ** (s + 1) for s in range(count)), 1).keep_counts(patches)
        return [keep / patches for keep in counts]

    def _build(self, model: nn.Module) -> None:
        if token_pruning_of(model) is None:
            add_token_pruning(model, self.stages.keep_ratios, self.stages.depths, self.stages.selector_width)
        path = token_pruning_of(model)
        path.temperature = self.options.temperature
        path.decide = "sample" if self.searching else "top_k"
        if self._distils() and self.searching:
            self._handles = [
                find_encoder_layers(model)[-1].module.register_forward_hook(self._remember("student")),
                find_encoder_layers(self.teacher)[-1].module.register_forward_hook(self._remember("teacher")),
            ]

    def _distils(self) -> bool:
        return self.teacher is not None and self.options.token_distillation_weight > 0

    def _remember(self, who: str):
        def hook(module, args, output):
            self._features[who] = output[0] if isinstance(output, tuple) else output
        return hook

    # ------------------------------------------------------------------ the search

    def loss_terms(self, model, inputs, outputs) -> dict[str, torch.Tensor]:
        path = token_pruning_of(model)
        kept = [fraction.mean() for fraction in path.kept_fractions]
        terms = {}
        if kept:  # toward the share the inference keeps (the keep ratio, rounded to whole tokens)
            targets = [keep / path.patch_count for keep in self._dropping_counts(path.patch_count)]
            gaps = torch.stack([share - target for share, target in zip(kept, targets)])
            terms["token_keep_rate"] = self.options.keep_rate_weight * gaps.square().mean()
            for s, share in enumerate(kept):
                self._kept_shares.setdefault(s, []).append(float(share.detach()))
        if self._distils():
            terms["token_distillation"] = self.options.token_distillation_weight * self._distillation(
                model, path, inputs, outputs)
        return terms

    def _dropping_counts(self, patches: int) -> list[int]:
        """Tokens kept by each stage that drops any (a stage keeping all it gets does nothing), in order."""
        alive, counts = patches, []
        for keep in self.stages.keep_counts(patches):
            if keep < alive:
                counts.append(keep)
                alive = keep
        return counts

    def _distillation(self, model, path, inputs, outputs) -> torch.Tensor:
        pixels = {key: value for key, value in inputs.items() if key != "labels"}
        teacher = self.teacher.to(next(model.parameters()).device)
        with torch.no_grad():
            teacher_outputs = teacher(**pixels)
        logits = distillation_loss(classification_logits(outputs)[1], classification_logits(teacher_outputs)[1],
                                   self.config.distillation_temperature)
        student, dense = self._features.pop("student"), self._features.pop("teacher")
        policy = path.policy
        special, patches = path.special, path.patch_count
        if policy is None:  # no stage dropped anything
            return logits
        # the student's patch positions are the dense model's (masking keeps the shapes)
        gap = (student[:, special:special + patches] - dense[:, special:special + patches]).square().mean(-1)
        features = (gap * policy).sum() / policy.sum().clamp_min(1)
        return logits + features

    def finalize(self, model) -> PruningPlan:
        """The selectors are trained: from now on the model trains on the inference decisions."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.searching = False
        token_pruning_of(model).decide = "top_k"
        return PruningPlan()

    def log_values(self) -> dict[str, float]:
        """Each stage's kept share under the sampled decisions, averaged over the steps since the last log."""
        logs = {f"token_kept_stage{s}": sum(v) / len(v) for s, v in self._kept_shares.items() if v}
        self._kept_shares = {}
        return logs

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.stages is None:
            return {}
        s = self.stages
        return {f"{PREFIX}depths": torch.tensor(s.depths, dtype=torch.int64),
                f"{PREFIX}keep_ratios": torch.tensor(s.keep_ratios, dtype=torch.float64),
                f"{PREFIX}selector_width": torch.tensor(s.selector_width, dtype=torch.int64),
                f"{PREFIX}selector_heads": torch.tensor(s.selector_heads, dtype=torch.int64),
                f"{PREFIX}searching": torch.tensor(self.searching),
                **({f"{PREFIX}latency_table": _json_tensor(self.latency_table)} if self.latency_table else {})}

    def load_state_dict(self, state: dict[str, torch.Tensor], model) -> None:
        """Rebuild the token path on the (dense) model before the checkpoint's weights are loaded into it."""
        own = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        if not own:
            return
        self.stages = TokenStages(tuple(own["depths"].tolist()), tuple(own["keep_ratios"].tolist()),
                                  int(own["selector_width"]), int(own["selector_heads"]))
        self.searching = bool(own["searching"])
        if "latency_table" in own:
            self.latency_table = json.loads(bytes(own["latency_table"].tolist()).decode())
        self._build(model)

    # ------------------------------------------------------------------ the card

    def card_recipe(self) -> list[str]:
        o = self.options
        lines = [
            f"Schedule: token selectors trained with sampled (Gumbel-softmax) decisions for the first "
            f"{o.search_fraction:.0%} of the optimizer steps (loss: classification + {o.keep_rate_weight} x keep-rate "
            f"gap^2 + {o.token_distillation_weight} x distillation of logits and kept-token features), then "
            f"fine-tuning on the inference decisions (top-k tokens per stage).",
        ]
        if self.stages is not None:
            stages = ", ".join(f"before layer {d}: {r:.0%}" for d, r in zip(self.stages.depths, self.stages.keep_ratios))
            lines.append(f"Token stages (share of the patch tokens kept): {stages}; dropped tokens are folded into "
                         f"one package token per stage.")
        table = self.latency_table
        if table is not None:
            named = [(f"layer {i}", times) for i, times in enumerate(table["layers_ms"])]
            if table.get("stages_ms"):
                named.append(("a token stage", table["stages_ms"]))
            rows = "; ".join(f"{name}: " + " / ".join(f"{ms:.3g}" for ms in times) for name, times in named)
            lines.append(
                f"Keep ratios chosen for the latency budget from a table measured on {table['hardware']} "
                f"({table['device']}, batch {table['batch_size']}, median of {table['repeats']}; whole model "
                f"{table['model_ms']:.3g} ms): ms per layer at {' / '.join(map(str, table['token_counts']))} "
                f"tokens: {rows}.")
        return lines

    def card_info(self) -> dict:
        """The card's facts, plus the latency table the keep ratios were read from (when there is one)."""
        info = super().card_info()
        if self.latency_table is not None:
            info["details"] = {"token_latency_table": self.latency_table}
        return info

    def citations(self) -> list[dict[str, str]]:
        return [SPVIT_CITATION]


_RATIOS_FIX = ("Give one or the other: drop keep_ratios to have the ratios chosen to meet {target}, or give "
               "keep_ratios that keep fewer tokens, or lower {target} to what the ratios remove.")


def _check_ratios_can_meet(config) -> None:
    """Refuse, when the method is made (before any work), keep_ratios that cannot meet a FLOPs target on any model.

    Every layer sees at least the last stage's share ``r`` of the tokens (packages and special tokens only add),
    and its FLOPs shrink at most quadratically with its tokens, so at most ``1 - r**2`` of the FLOPs go. The exact
    check, on the model, is :meth:`SPViTTokens._check_ratios_meet` when the run starts.
    """
    ratios, budget = config.method_options.keep_ratios, config.budget
    if ratios is None or budget.metric != "flops":
        return
    most = 1 - ratios[-1] ** 2
    if most < budget.fraction:
        raise ValueError(
            f"keep_ratios={list(ratios)} keep at least {ratios[-1]:.0%} of the tokens in every layer, which removes at "
            f"most {most:.0%} of the FLOPs, but {budget.target_name}={budget.fraction:g} asks to remove "
            f"{budget.fraction:.0%}. {_RATIOS_FIX.format(target=budget.target_name)}"
        )


def _token_grid(model: nn.Module) -> list[int]:
    """Token counts the latency table is measured at: the full sequence and down to one patch token, in
    sixteenths of the patches (latencies in between are interpolated)."""
    tokens, patches = num_tokens(model), num_patches(model)
    special = tokens - patches
    step = max(1, patches // 16)
    return sorted({*(special + kept for kept in range(1, patches + 1, step)), tokens})


def _timed_stage(model: nn.Module, options: TokenPruningOptions):
    """A stage of the shape the method builds (an untrained selector: timing needs no training), keeping half of
    the patch tokens it receives: what the latency table times as a stage's own cost."""
    shape = stages_for(model, [0.5], None, options.selector_width)
    parameter = next(model.parameters())
    selector = TokenSelector(embedding_width(model), shape.selector_heads, shape.selector_width)
    selector = selector.to(device=parameter.device, dtype=parameter.dtype).eval()
    special = num_tokens(model) - num_patches(model)

    def stage(hidden: torch.Tensor) -> torch.Tensor:
        alive = hidden.shape[1] - special
        return drop_tokens(hidden, special, alive, max(1, alive // 2), selector)

    return stage


def predicted_latency_ms(table: dict, path, tokens: int) -> float:
    """The model's latency with token path ``path`` as ``table`` predicts it: the measured whole-model latency,
    with each layer's time at the full sequence replaced by its time at the tokens it sees (interpolated), plus
    each stage's own time at the tokens it receives (tables from before stages were timed have none)."""
    counts = table["token_counts"]

    def at(times: list[float], n: float) -> float:
        n = min(max(n, counts[0]), counts[-1])
        for (a, ta), (b, tb) in zip(zip(counts, times), zip(counts[1:], times[1:])):
            if a <= n <= b:
                return ta + (tb - ta) * (n - a) / (b - a)
        return times[-1]

    seen = path.tokens_per_layer(tokens, len(table["layers_ms"]))
    layers = sum(at(times, n) - at(times, tokens) for times, n in zip(table["layers_ms"], seen))
    stages = sum(at(table["stages_ms"], n) for n in path.stage_inputs(tokens)) if table.get("stages_ms") else 0.0
    return table["model_ms"] + layers + stages


def _json_tensor(value: dict) -> torch.Tensor:
    """``value`` as JSON bytes in a uint8 tensor: checkpoints hold tensors only."""
    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)
