"""Token pruning (SPViT, Kong et al., ECCV 2022): learned selectors shorten the sequence at a few depths.

Before each *stage* depth a :class:`TokenSelector` scores the patch tokens still in the sequence;
the stage keeps a fixed share of the image's patches (``keep_ratios``, of the original patch count)
and folds the tokens it drops into one *package token*, their mean weighted by their keep
probabilities, which stays in the sequence from then on (one per stage). The class, distillation
and register tokens are never dropped. Every later layer then works on fewer tokens: LayerNorms,
residual adds, attention and MLP alike.

Two ways to run a stage, which give the same logits for the same decisions:

- *dropping* (eval mode, inference): the top-``k`` patch tokens by keep score are gathered, per
  image, in their original order; ``k`` is fixed per stage, so any batch size works, batched results
  equal per-image results, and ``torch.export`` sees static shapes.
- *masking* (train mode): shapes stay fixed. Each token's keep decision is a hard sample of a
  binary Gumbel-softmax (logistic noise) with a straight-through gradient; dropped tokens stay in
  the sequence but are masked out of every later attention as keys (each token still attends to
  itself), and the package token is appended as in dropping. The attention is DynamicViT's softmax
  with a policy (:func:`policy_attention`, registered with transformers' ``AttentionInterface`` and
  set on the model by :func:`attach_token_pruning`): the keys' exponentials are multiplied by the
  decisions, so dropped keys weigh exactly zero and the decisions get the gradient of how much
  each key would matter. A model switched to another attention implementation afterwards still
  masks exactly (an additive mask goes along), but its decisions then learn from the losses only.
  ``TokenPruning.decide = "top_k"`` makes the masked forward take the inference decisions instead.

The path is recorded in the model config (``token_pruning``: depths, keep ratios, selector width)
and rebuilt by the ``Pruned*`` classes, so a token-pruned model reloads with ``from_pretrained``.
Families whose tokens carry a position structure after the embeddings (BEiT's relative position
bias) or whose classifier averages the patch tokens (DINOv2) have no token path.

Imports only torch, transformers and ``.architectures``: this file is copied next to saved models
for ``trust_remote_code=True`` loading.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .architectures import embedding_width, embeddings_module, family_of, find_encoder_layers, num_patches, num_tokens

CONFIG_KEY = "token_pruning"  # the model config attribute recording the stages
TOKEN_FAMILIES = ("vit", "deit", "vit_msn")  # their classifiers read the class (and distillation) token only
WHY_NOT = {
    "beit": "its relative position bias is indexed by the fixed patch grid",
    "dinov2": "its classifier averages the patch tokens, which token pruning replaces",
}
POLICY_ATTENTION = "hf_vitprune_token_policy"  # the attention implementation name token pruning sets
FALLBACK_ATTRIBUTE = "hf_vitprune_attention"  # on each attention module: the implementation used without a policy


@dataclass(frozen=True)
class TokenStages:
    """Where tokens are dropped and how many stay.

    Stage ``s`` runs before encoder layer ``depths[s]`` and keeps ``keep_ratios[s]`` of the image's
    patch tokens (of the original count, so ratios do not increase). Each selector has
    ``selector_heads`` heads of ``selector_width`` features.
    """

    depths: tuple[int, ...]
    keep_ratios: tuple[float, ...]
    selector_width: int
    selector_heads: int = 1

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "keep_ratios", tuple(self.keep_ratios))
        if not self.depths:
            raise ValueError("Token pruning needs at least one stage: give one depth and keep ratio per stage.")
        if len(self.depths) != len(self.keep_ratios):
            raise ValueError(
                f"Token pruning has {len(self.depths)} stage depths {list(self.depths)} but {len(self.keep_ratios)} "
                f"keep ratios {list(self.keep_ratios)}: give one keep ratio per stage."
            )
        for depth in self.depths:
            if isinstance(depth, bool) or not isinstance(depth, int):
                raise ValueError(f"Token pruning stage depth {depth!r} must be an integer (an encoder layer index).")
        if list(self.depths) != sorted(set(self.depths)):
            raise ValueError(f"Token pruning stage depths {list(self.depths)} must be distinct and increasing.")
        for ratio in self.keep_ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(
                    f"Token pruning keep ratio {ratio!r} must be a number in (0, 1]: the share of the image's patch "
                    f"tokens kept after the stage."
                )
        if any(later > earlier for earlier, later in zip(self.keep_ratios, self.keep_ratios[1:])):
            raise ValueError(
                f"Token pruning keep ratios {list(self.keep_ratios)} increase; each is a share of the original "
                f"patches, and a later stage cannot keep tokens an earlier one dropped."
            )
        for name in ("selector_width", "selector_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Token pruning {name}={value!r} must be a positive integer.")

    def check_fits(self, layers: int) -> None:
        if len(self.depths) > layers:
            raise ValueError(
                f"Token pruning asks for {len(self.depths)} stages but the model has {layers} encoder layers; use at "
                f"most one stage per layer."
            )
        outside = [d for d in self.depths if not 0 <= d < layers]
        if outside:
            raise ValueError(
                f"Token pruning stage depths {outside} are outside the model: a stage runs before an encoder layer, "
                f"0..{layers - 1}."
            )

    def keep_counts(self, patches: int) -> list[int]:
        """Patch tokens kept after each stage, for an image of ``patches`` patches."""
        return [max(1, round(ratio * patches)) for ratio in self.keep_ratios]

    def to_dict(self) -> dict:
        data = asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> TokenStages:
        return cls(depths=tuple(data["depths"]), keep_ratios=tuple(data["keep_ratios"]),
                   selector_width=int(data["selector_width"]), selector_heads=int(data.get("selector_heads", 1)))


def default_depths(layers: int, stages: int = 3) -> tuple[int, ...]:
    """``stages`` depths spread over ``layers`` as the paper places them (3, 6, 9 of 12); fewer where the model is
    too shallow for them to differ. A stage before layer 0 would score the bare embeddings, so it is used only by a
    one-layer model, which has no other place for one."""
    spread = {min(round(s * layers / (stages + 1)), layers - 1) for s in range(1, stages + 1)} - {0}
    return tuple(sorted(spread)) or (0,)


class TokenSelector(nn.Module):
    """Keep logits of a stage's patch tokens.

    Per attention head, a few features of each token (a linear map of its normalised features) and
    their mean over the tokens still in the sequence (the global feature) give a logit; a
    squeeze-excitation branch on the global feature weights the heads.
    """

    def __init__(self, width: int, heads: int, features: int):
        super().__init__()
        self.heads, self.features = heads, features
        self.norm = nn.LayerNorm(width)
        self.local = nn.Linear(width, heads * features)
        self.head_weights = nn.Linear(heads * features, heads)
        self.score = nn.Parameter(torch.randn(heads, 2 * features) * (2 * features) ** -0.5)
        self.score_bias = nn.Parameter(torch.zeros(heads))

    def forward(self, tokens: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` (batch, n, width) -> keep logits (batch, n); ``alive`` (batch, n) marks the tokens the
        global feature averages (default: all)."""
        batch, n, _ = tokens.shape
        local = nn.functional.gelu(self.local(self.norm(tokens)))
        if alive is None:
            pooled = local.mean(1, keepdim=True)
        else:
            weights = alive.unsqueeze(-1).to(local.dtype)
            pooled = (local * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
        head_weights = self.head_weights(pooled).softmax(-1)  # (batch, 1, heads)
        features = torch.cat([local.view(batch, n, self.heads, self.features),
                              pooled.view(batch, 1, self.heads, self.features).expand(batch, n, -1, -1)], dim=-1)
        logits = (features * self.score.to(features.dtype)).sum(-1) + self.score_bias.to(features.dtype)
        return (logits * head_weights).sum(-1)

    def flops(self, tokens: int) -> int:
        """Matrix-product FLOPs for ``tokens`` tokens (the element-wise work is not counted, as elsewhere)."""
        return 2 * tokens * self.local.in_features * self.local.out_features + 2 * self.head_weights.weight.numel()


class TokenPruning(nn.Module):
    """The token path of one model: its selectors, and the hooks that run them (see the module docstring)."""

    def __init__(self, model: nn.Module, stages: TokenStages):
        super().__init__()
        layers = find_encoder_layers(model)
        stages.check_fits(len(layers))
        self.stages = stages
        self.special = num_tokens(model) - num_patches(model)
        self.selectors = nn.ModuleList([TokenSelector(embedding_width(model), stages.selector_heads,
                                                      stages.selector_width) for _ in stages.depths])
        alive = num_patches(model)
        with torch.no_grad():  # start each selector keeping its share of the tokens it sees, on average
            for selector, keep in zip(self.selectors, stages.keep_counts(alive)):
                share = min(max(keep / alive, 0.01), 0.99)
                selector.score_bias.fill_(math.log(share / (1 - share)))
                alive = min(alive, keep)
        self.decide = "sample"  # in train mode: "sample" (Gumbel) or "top_k" (the inference decisions)
        self.temperature = 1.0
        self.kept_fractions: list[torch.Tensor] = []  # per stage, (batch,) kept share of the last masked forward
        self._state: dict = {}
        self._handles = [layer.module.register_forward_pre_hook(self._before_layer(layer.index), with_kwargs=True)
                         for layer in layers if layer.index >= stages.depths[0]]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def patch_count(self) -> int:
        """Patch tokens of the images of the last forward."""
        return self._state["patches"]

    @property
    def policy(self) -> torch.Tensor | None:
        """(batch, patches): 1 for the patch tokens the last masked forward kept to its end, else 0."""
        return self._state.get("policy")

    # ------------------------------------------------------------------ counting

    def tokens_per_layer(self, tokens: int, layers: int) -> list[int]:
        """Tokens each of ``layers`` encoder layers sees when the first sees ``tokens`` (dropping)."""
        patches = tokens - self.special
        counts, alive, packages = [], patches, 0
        stage_at = dict(zip(self.stages.depths, self.stages.keep_counts(patches)))
        for index in range(layers):
            if index in stage_at and stage_at[index] < alive:
                alive, packages = stage_at[index], packages + 1
            counts.append(self.special + alive + packages)
        return counts

    def stage_inputs(self, tokens: int) -> list[int]:
        """Tokens each stage that drops any receives (in order) when the first layer sees ``tokens``."""
        seen = self.tokens_per_layer(tokens, max(self.stages.depths) + 1)
        before = [tokens, *seen]  # layer d receives before[d]: the sequence before stage d runs
        patches = tokens - self.special
        inputs, alive = [], patches
        for depth, keep in zip(self.stages.depths, self.stages.keep_counts(patches)):
            if keep < alive:
                inputs.append(before[depth])
                alive = keep
        return inputs

    def selector_flops(self, tokens: int) -> int:
        """FLOPs of all selectors for an image whose first layer sees ``tokens`` tokens."""
        patches = tokens - self.special
        alive, flops = patches, 0
        for selector, keep in zip(self.selectors, self.stages.keep_counts(patches)):
            if keep < alive:
                flops += selector.flops(alive)
                alive = keep
        return flops

    # ------------------------------------------------------------------ the forward

    def _before_layer(self, index: int):
        stage = self.stages.depths.index(index) if index in self.stages.depths else None

        def hook(module, args, kwargs):
            hidden = args[0]
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            if index == self.stages.depths[0]:
                _check_no_padding(mask)
                self._state = {"patches": hidden.shape[1] - self.special, "alive": hidden.shape[1] - self.special,
                               "packages": 0, "policy": None, "mask": None, "policy_matrix": None}
                self.kept_fractions = []
            if stage is not None:
                hidden = self._mask_stage(stage, hidden) if self.training else self._drop_stage(stage, hidden)
            mask = self._state.get("mask")
            if self._state.get("policy_matrix") is not None:
                kwargs = {**kwargs, "token_policy": self._state["policy_matrix"]}
            if len(args) > 1:
                return (hidden, mask, *args[2:]), kwargs
            if mask is not None or "attention_mask" in kwargs:  # the stages' mask replaces the model's
                kwargs = {**kwargs, "attention_mask": mask}
            return (hidden,), kwargs

        return hook

    def _keep(self, stage: int) -> int:
        return self.stages.keep_counts(self._state["patches"])[stage]

    def _drop_stage(self, stage: int, hidden: torch.Tensor) -> torch.Tensor:
        state = self._state
        alive, keep = state["alive"], self._keep(stage)
        if keep >= alive:  # this stage keeps everything: it does nothing
            return hidden
        hidden = drop_tokens(hidden, self.special, alive, keep, self.selectors[stage])
        state["alive"], state["packages"] = keep, state["packages"] + 1
        return hidden

    def _mask_stage(self, stage: int, hidden: torch.Tensor) -> torch.Tensor:
        state, special, patches_count = self._state, self.special, self._state["patches"]
        keep = self._keep(stage)
        if keep >= state["alive"]:
            return hidden
        patches = hidden[:, special:special + patches_count]
        policy = state["policy"] if state["policy"] is not None else patches.new_ones(patches.shape[:2])
        logits = self.selectors[stage](patches, alive=policy)
        if self.decide == "top_k":
            chosen = logits.masked_fill(policy == 0, float("-inf")).topk(keep, dim=1).indices
            decision = torch.zeros_like(logits).scatter(1, chosen, 1.0)
        else:
            decision = _straight_through_sample(logits, self.temperature)
        new_policy = policy * decision
        # the package's weights pass no gradient to the selector: through them (the membership, or the keep
        # scores) training drove every stage far below its keep ratio (docs/methods.md)
        package = _package(patches, (torch.sigmoid(logits) * policy * (1 - decision)).detach())
        hidden = torch.cat([hidden, package], 1)
        state["policy"], state["alive"], state["packages"] = new_policy, keep, state["packages"] + 1
        self.kept_fractions.append(new_policy.sum(1) / patches_count)
        keys = torch.cat([new_policy.new_ones(len(new_policy), special), new_policy,
                          new_policy.new_ones(len(new_policy), hidden.shape[1] - special - patches_count)], 1)
        eye = torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device)
        allowed = keys[:, None, None, :] + eye * (1 - keys[:, None, None, :])  # each token sees itself
        state["policy_matrix"] = allowed
        hidden_keys = allowed.detach() == 0  # for an implementation without the policy: exact masking, no gradient
        state["mask"] = torch.zeros_like(allowed, dtype=hidden.dtype).masked_fill(hidden_keys,
                                                                                  torch.finfo(hidden.dtype).min)
        return hidden


def drop_tokens(hidden: torch.Tensor, special: int, alive: int, keep: int, selector: TokenSelector) -> torch.Tensor:
    """One stage at inference: of the ``alive`` patch tokens after the ``special`` ones, keep the ``keep`` that
    ``selector`` scores highest, in their order, and fold the others into a package token appended at the end."""
    patches = hidden[:, special:special + alive]
    logits = selector(patches)
    kept = logits.topk(keep, dim=1).indices.sort(dim=1).values
    index = kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    package = _package(patches, torch.sigmoid(logits).scatter(1, kept, 0.0))  # the dropped ones' keep scores
    return torch.cat([hidden[:, :special], patches.gather(1, index), hidden[:, special + alive:], package], 1)


def _check_no_padding(mask: torch.Tensor | None) -> None:
    """Refuse an attention mask that hides tokens: the stages change the sequence, so it could not follow.

    transformers hands the layers an all-visible mask where it cannot prove there is no padding
    (under ``torch.export``); that one, which the stages replace, is fine.
    """
    if mask is None or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return
    hides = (~mask).any() if mask.dtype == torch.bool else (mask < 0).any()
    if bool(hides):
        raise ValueError("Token pruning takes no attention_mask that hides tokens: its stages change the sequence. "
                         "Call the model without attention_mask (images have no padding).")


def _package(patches: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The dropped tokens' mean weighted by ``weights`` (their keep probabilities), as one token."""
    total = weights.sum(1, keepdim=True).clamp_min(1e-6)
    return ((weights / total).unsqueeze(-1) * patches).sum(1, keepdim=True)


def _straight_through_sample(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hard 0/1 keep decisions from a binary Gumbel-softmax (logistic noise), with the soft sample's gradient."""
    uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(uniform) - torch.log1p(-uniform)) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def policy_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     token_policy: torch.Tensor | None = None, **kwargs):
    """Attention with DynamicViT's policy softmax when the token path passes ``token_policy`` (batch, 1, n, n:
    1 where a query may see a key, straight-through decisions), else the model's own implementation.

    ``softmax_with_policy``: exp(score - max) x policy, normalised, with the max over the visible keys
    (so the visible weights sum to at least 1). Hidden keys weigh exactly zero. Their decisions'
    gradient treats a hidden key as no heavier than the strongest visible one (its exponent is capped
    at 0): uncapped, a trained model's hidden keys that outscore every visible one gave gradient norms
    up to 3e5 (median 74) where the capped ones stay near the unmasked training's (docs/methods.md).
    """
    if token_policy is None:
        own = ALL_ATTENTION_FUNCTIONS.get_interface(getattr(module, FALLBACK_ATTRIBUTE, "sdpa"), _eager_attention)
        return own(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling
    visible = token_policy.detach() > 0
    top = scores.detach().masked_fill(~visible, float("-inf")).amax(-1, keepdim=True)
    weights = torch.exp((scores - top).clamp(max=0.0)) * token_policy.float()
    weights = (weights / weights.sum(-1, keepdim=True)).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The families' eager attention (their ``eager_attention_forward``), for a model that ran eager."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(POLICY_ATTENTION, policy_attention)


# --------------------------------------------------------------------------- attaching


def base_model(model: nn.Module) -> nn.Module:
    """The module holding the embeddings and the encoder (``model.vit`` of a classifier)."""
    embeddings = embeddings_module(model)
    for module in model.modules():
        if getattr(module, "embeddings", None) is embeddings:
            return module
    raise ValueError(f"{type(model).__name__} has no module holding its embeddings.")


def token_pruning_of(model: nn.Module) -> TokenPruning | None:
    """The model's token path, or None."""
    return next((m for m in model.modules() if isinstance(m, TokenPruning)), None)


def check_token_family(model: nn.Module) -> None:
    family = family_of(model).model_type
    if family not in TOKEN_FAMILIES:
        raise ValueError(
            f"{type(model).__name__} has no token path: {WHY_NOT.get(family, 'its family is not supported')}. Token "
            f"pruning supports the {', '.join(TOKEN_FAMILIES)} families; prune its heads, neurons and widths instead."
        )


def attach_token_pruning(model: nn.Module, stages: TokenStages) -> TokenPruning:
    """Build the token path of ``stages`` on ``model`` (its selectors under the base model as ``token_pruning``)."""
    check_token_family(model)
    if token_pruning_of(model) is not None:
        raise ValueError(f"{type(model).__name__} already has a token path; a model takes one.")
    path = TokenPruning(model, stages)
    path.to(next(model.parameters()).device)
    base_model(model).token_pruning = path
    current = model.config._attn_implementation
    if current != POLICY_ATTENTION:  # the policy attention, falling back to the model's own without a policy
        for layer in find_encoder_layers(model):
            setattr(layer.attention, FALLBACK_ATTRIBUTE, current)
        model.set_attn_implementation(POLICY_ATTENTION)
    return path


def stages_for(model: nn.Module, keep_ratios: Sequence[float], depths: Sequence[int] | None = None,
               selector_width: int | None = None) -> TokenStages:
    """The stages a user asks for, with the defaults filled in: depths spread over the model as the paper's
    (one per keep ratio), selectors with as many heads as the first layer and a quarter of its head dim each."""
    layers = len(find_encoder_layers(model))
    if depths is None:
        depths = default_depths(layers, len(keep_ratios))
        if len(depths) != len(keep_ratios):
            raise ValueError(
                f"{len(keep_ratios)} token pruning stages do not fit the {layers} encoder layers; give fewer keep "
                f"ratios (at most one stage per layer) or explicit depths."
            )
    first = find_encoder_layers(model)[0]
    if selector_width is None:
        selector_width = max(4, math.ceil(first.head_dim / 4))
    stages = TokenStages(tuple(depths), tuple(keep_ratios), selector_width, max(1, first.num_heads))
    stages.check_fits(layers)
    return stages
