"""Unit-importance criteria: GOHSP graph ranking, magnitude, Taylor, random."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import BeitConfig, BeitForImageClassification, ViTConfig, ViTForImageClassification, ViTModel

from hf_vitprune.architectures import find_encoder_layers
from hf_vitprune.importance import (
    CRITERIA,
    REQUIRES_DATA,
    ConvergenceError,
    HeadGraphStatistics,
    ImportanceOptions,
    UnitScores,
    collect_head_statistics,
    get_criterion,
    score_graph,
    score_magnitude,
    score_random,
    score_taylor,
    stationary_importance,
    transition_matrix,
)

HEAD_DIM = 8  # hidden 32 / 4 heads


def tiny_config(**overrides) -> ViTConfig:
    values = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=16,
        patch_size=4,
        num_labels=3,
        attn_implementation="eager",
    )
    values.update(overrides)
    return ViTConfig(**values)


def tiny_classifier(seed: int = 0, **overrides) -> ViTForImageClassification:
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_config(**overrides)).eval()


def make_batches(count: int = 4, size: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(size, 3, 16, 16, generator=generator),
            "labels": torch.randint(0, 3, (size,), generator=generator),
        }
        for _ in range(count)
    ]


def random_stats(num_heads: list[int], seed: int = 0, images: int = 5) -> HeadGraphStatistics:
    generator = torch.Generator().manual_seed(seed)
    edges = [
        torch.rand(a, b, generator=generator, dtype=torch.float64) * images for a, b in zip(num_heads, num_heads[1:])
    ]
    return HeadGraphStatistics(num_heads, edges, images)


# --------------------------------------------------------------------------- the Markov chain


def test_transition_matrix_matches_hand_built_chain():
    """Directed: a head of layer l+1 steps to the heads of layer l it reads from; first-layer heads teleport."""
    stats = random_stats([3, 4, 2])
    n, damping = 9, 0.85
    adjacency = np.zeros((n, n))
    offsets = [0, 3, 7, 9]
    for layer, edges in enumerate(stats.edge_sums):
        for i in range(edges.shape[0]):
            for j in range(edges.shape[1]):
                adjacency[offsets[layer + 1] + j, offsets[layer] + i] = edges[i, j].item() / stats.num_images
    expected = np.full((n, n), 1.0 / n)
    rows = adjacency.sum(1) > 0
    expected[rows] = damping * adjacency[rows] / adjacency[rows].sum(1, keepdims=True) + (1 - damping) / n
    chain = transition_matrix(stats, damping)
    np.testing.assert_allclose(chain.numpy(), expected, rtol=0, atol=1e-14)
    np.testing.assert_allclose(chain.sum(1).numpy(), np.ones(n), atol=1e-14)
    assert (chain[:3] == 1.0 / n).all()  # the first layer's heads have no producer to step to


def test_importance_propagates_over_two_layers():
    """Heads A and B of layer 0 have equal one-hop edges; only A's consumer feeds a strongly connected head
    two layers down, so only A's importance reflects it (the symmetric chain ranked them equal)."""
    weak, strong = 0.05, 0.9
    edges = [torch.full((2, 2), weak, dtype=torch.float64), torch.full((2, 2), weak, dtype=torch.float64)]
    edges[0][0, 0] = edges[0][1, 1] = 0.5  # A (head 0) -> X (head 0 of layer 1), B (head 1) -> Y: equal
    edges[1][0, :] = strong  # X feeds both heads of layer 2 strongly, Y only weakly
    stats = HeadGraphStatistics([2, 2, 2], edges, num_images=1)
    first = stationary_importance(stats, tolerance=1e-14)[0]
    assert first[0] > 1.2 * first[1]


@pytest.mark.parametrize("num_heads, damping", [([3, 4, 2], 0.85), ([4, 4, 4, 4], 0.5), ([6, 1, 5], 0.95)])
def test_stationary_distribution_is_leading_left_eigenvector(num_heads, damping):
    stats = random_stats(num_heads, seed=len(num_heads))
    importance = stationary_importance(stats, damping=damping, tolerance=1e-12)
    assert [t.numel() for t in importance] == num_heads
    pi = torch.cat(importance)
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-12)

    chain = transition_matrix(stats, damping)
    values, vectors = torch.linalg.eig(chain.T)  # left eigenvectors of the chain
    leading = torch.argmin((values - 1).abs())
    assert abs(values[leading].real.item() - 1) < 1e-10
    eigenvector = vectors[:, leading].real
    eigenvector = eigenvector / eigenvector.sum()
    torch.testing.assert_close(pi, eigenvector, rtol=0, atol=1e-6)


def test_weakly_connected_head_ranks_lowest_on_hand_built_statistics():
    edges = [torch.full((3, 3), 0.6, dtype=torch.float64), torch.full((3, 3), 0.6, dtype=torch.float64)]
    edges[0][:, 1] = 0.01  # head 1 of the middle layer barely correlates with the layer before...
    edges[1][1, :] = 0.01  # ...and after it
    stats = HeadGraphStatistics([3, 3, 3], edges, num_images=1)
    middle = stationary_importance(stats)[1]  # the directed chain ranks heads within a layer
    assert middle.argmin().item() == 1
    assert middle[1] < 0.5 * middle[0]


def test_isolated_heads_teleport_and_single_layer_is_uniform():
    edges = [torch.ones(2, 3, dtype=torch.float64)]
    edges[0][0, :] = 0.0  # head 0 of layer 0 is read by no head of layer 1
    stats = HeadGraphStatistics([2, 3], edges, num_images=1)
    chain = transition_matrix(stats, 0.85)
    torch.testing.assert_close(chain[0], torch.full((5,), 0.2, dtype=torch.float64))
    pi = torch.cat(stationary_importance(stats))
    assert pi[0] < pi[1]  # nothing passes mass to head 0 but the teleport

    single = stationary_importance(HeadGraphStatistics([4], [], num_images=3))
    torch.testing.assert_close(single[0], torch.full((4,), 0.25, dtype=torch.float64))


def test_power_iteration_that_cannot_converge_raises():
    stats = random_stats([4, 4, 4])
    with pytest.raises(ConvergenceError, match="did not converge.*after 3 iterations"):
        stationary_importance(stats, damping=0.85, tolerance=1e-12, max_iterations=3)


# --------------------------------------------------------------------------- statistics on a model


def _pearson_reference(signals_a: np.ndarray, signals_b: np.ndarray) -> np.ndarray:
    """sum over images of |corrcoef(a_i, b_j)|; signals have shape (images, heads, features)."""
    total = np.zeros((signals_a.shape[1], signals_b.shape[1]))
    for image in range(signals_a.shape[0]):
        for i in range(signals_a.shape[1]):
            for j in range(signals_b.shape[1]):
                total[i, j] += abs(np.corrcoef(signals_a[image, i], signals_b[image, j])[0, 1])
    return total


def test_output_statistic_is_summed_abs_pearson_of_head_contributions():
    model = tiny_classifier()
    batches = make_batches(2, 3)
    layers = find_encoder_layers(model)
    contexts = {layer.index: [] for layer in layers}
    handles = [
        layer.attention.o_proj.register_forward_pre_hook(lambda m, a, i=layer.index: contexts[i].append(a[0].detach()))
        for layer in layers
    ]
    with torch.no_grad():
        for batch in batches:
            model(pixel_values=batch["pixel_values"])
    for handle in handles:
        handle.remove()

    signals = []
    for layer in layers:
        context = torch.cat(contexts[layer.index]).double()
        weight = layer.attention.o_proj.weight.detach().double()
        per_head = [
            (context[..., h * HEAD_DIM : (h + 1) * HEAD_DIM] @ weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM].T)
            .flatten(1)
            for h in range(layer.num_heads)
        ]
        signals.append(torch.stack(per_head, 1).numpy())

    stats = collect_head_statistics(model, batches, "output")
    assert stats.num_images == 6 and stats.num_heads == [4, 4, 4]
    for index, edges in enumerate(stats.edge_sums):
        assert edges.dtype == torch.float64
        expected = _pearson_reference(signals[index], signals[index + 1])
        np.testing.assert_allclose(edges.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_attention_statistic_is_summed_abs_pearson_of_attention_maps():
    model = tiny_classifier()
    batches = make_batches(2, 2)
    with torch.no_grad():
        maps = [model(pixel_values=b["pixel_values"], output_attentions=True).attentions for b in batches]
    per_layer = [torch.cat([m[layer] for m in maps]).flatten(2).double().numpy() for layer in range(3)]
    stats = collect_head_statistics(model, batches, "attention")
    for index, edges in enumerate(stats.edge_sums):
        expected = _pearson_reference(per_layer[index], per_layer[index + 1])
        np.testing.assert_allclose(edges.numpy(), expected, rtol=1e-4, atol=1e-5)


def _model_with_uncorrelated_head(layer_index: int = 1, head: int = 2) -> ViTModel:
    """A tiny ViTModel in which one head's residual contribution is uncorrelated with every head next to it.

    The head writes ``+s`` into channel 0 and ``-s`` into channel 1 of every token (zero mean over the
    flattened tokens x channels), while the heads of the neighbouring layers never write to channels 0
    and 1: covariance E[ab] - E[a]E[b] = 0 - 0 * E[b] = 0 exactly, for every image.
    """
    torch.manual_seed(0)
    model = ViTModel(tiny_config(), add_pooling_layer=False).eval()
    layers = find_encoder_layers(model)
    columns = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    with torch.no_grad():
        o_proj = layers[layer_index].attention.o_proj.weight
        direction = torch.randn(HEAD_DIM)
        o_proj[:, columns] = 0.0
        o_proj[0, columns] = direction
        o_proj[1, columns] = -direction
        for neighbour in (layer_index - 1, layer_index + 1):
            layers[neighbour].attention.o_proj.weight[0:2, :] = 0.0
    return model


def test_head_uncorrelated_with_neighbours_ranks_lowest_end_to_end():
    model = _model_with_uncorrelated_head(layer_index=1, head=2)
    batches = make_batches(3, 4)
    stats = collect_head_statistics(model, batches)
    means = stats.mean_edges()
    assert means[0][:, 2].abs().max() < 1e-5 and means[1][2, :].abs().max() < 1e-5
    others = torch.cat([means[0][:, [0, 1, 3]].flatten(), means[1][[0, 1, 3], :].flatten()])
    assert others.min() > 1e-3  # the other heads do correlate with their neighbours

    scores = score_graph(model, batches)
    assert scores.heads[1].argmin().item() == 2
    assert scores.heads[1][2] < 0.6 * scores.heads[1][[0, 1, 3]].min()  # teleport mass only
    assert torch.cat(scores.heads).sum().item() == pytest.approx(1.0)


def test_statistics_of_two_halves_merge_to_the_whole():
    model = tiny_classifier()
    batches = make_batches(4, 3)
    whole = collect_head_statistics(model, batches)
    merged = collect_head_statistics(model, batches[:2]).merge(collect_head_statistics(model, batches[2:]))
    assert merged.num_images == whole.num_images == 12
    for a, b in zip(merged.edge_sums, whole.edge_sums):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.cat(stationary_importance(merged)), torch.cat(stationary_importance(whole)), rtol=0, atol=1e-12
    )

    doubled = collect_head_statistics(model, batches).reduce(lambda flat: flat * 2)  # a stand-in for 2 equal ranks
    assert doubled.num_images == 24
    for a, b in zip(doubled.mean_edges(), whole.mean_edges()):
        torch.testing.assert_close(a, b)

    with pytest.raises(ValueError, match="Cannot merge statistics of different graphs"):
        whole.merge(collect_head_statistics(model, batches[:1], "attention"))


_WORKER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import ViTForImageClassification
    from hf_vitprune.importance import score_graph, score_taylor

    rank, workdir = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=2)
    try:
        torch.manual_seed(1000 + rank)  # the scores must not depend on a process's RNG
        model = ViTForImageClassification.from_pretrained(f"{workdir}/model").eval()
        tensors = load_file(f"{workdir}/batches.safetensors")
        batches = [{"pixel_values": tensors[f"pixel_values_{i}"], "labels": tensors[f"labels_{i}"]}
                   for i in range(len(tensors) // 2) if i % 2 == rank]
        gohsp = score_graph(model, batches)
        taylor = score_taylor(model, batches)
        result = {"gohsp": [t.tolist() for t in gohsp.heads], "taylor": [t.tolist() for t in taylor.heads],
                  "taylor_neurons": [t.tolist() for t in taylor.neurons]}
        with open(f"{workdir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()
    """
)


def test_two_gloo_processes_with_half_the_batches_each_agree_with_one_process(tmp_path):
    model = tiny_classifier()
    batches = make_batches(4, 3)
    model.save_pretrained(tmp_path / "model")
    tensors = {}
    for i, batch in enumerate(batches):
        tensors[f"pixel_values_{i}"], tensors[f"labels_{i}"] = batch["pixel_values"], batch["labels"]
    save_file(tensors, str(tmp_path / "batches.safetensors"))
    script = tmp_path / "worker.py"
    script.write_text(_WORKER_SCRIPT)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
        )
        for rank in range(2)
    ]
    try:
        outputs = [worker.communicate(timeout=120) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # bit-identical on both ranks

    # Same sums as one process up to float32 rounding inside the per-image correlations
    # (thread counts differ between the processes).
    single_gohsp = score_graph(model, batches)
    single_taylor = score_taylor(model, batches)
    for layer in range(3):
        np.testing.assert_allclose(ranks[0]["gohsp"][layer], single_gohsp.heads[layer].numpy(), rtol=1e-5, atol=0)
        np.testing.assert_allclose(ranks[0]["taylor"][layer], single_taylor.heads[layer].numpy(), rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(
            ranks[0]["taylor_neurons"][layer], single_taylor.neurons[layer].numpy(), rtol=1e-5, atol=1e-12
        )
    order = np.argsort(np.concatenate(ranks[0]["gohsp"]))
    assert (order == np.argsort(torch.cat(single_gohsp.heads).numpy())).all()


def test_statistics_restore_training_mode_and_remove_hooks_even_on_error():
    model = tiny_classifier()
    model.train()
    layers = find_encoder_layers(model)
    bad = [make_batches(1, 2)[0], {"pixel_values": torch.randn(2, 3, 20, 20)}]  # second batch: wrong image size
    with pytest.raises(ValueError, match="Input image size"):
        collect_head_statistics(model, bad, "attention")
    assert all(module.training for module in model.modules())
    for layer in layers:
        for module in (layer.attention.o_proj, layer.attention.q_proj, layer.attention.k_proj):
            assert not module._forward_pre_hooks and not module._forward_hooks


def test_beit_with_relative_position_bias_scores_with_both_statistics():
    torch.manual_seed(0)
    config = BeitConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16, patch_size=4,
        use_relative_position_bias=True, num_labels=3,
    )
    model = BeitForImageClassification(config).eval()
    batches = make_batches(2, 2)
    for statistic in ("output", "attention"):
        scores = score_graph(model, batches, options=ImportanceOptions(edge_statistic=statistic))
        scores.validate(model)
        assert torch.cat(scores.heads).sum().item() == pytest.approx(1.0)
    # the head group includes the layer's column of the relative position bias table
    layer = find_encoder_layers(model)[0]
    with torch.no_grad():
        before = score_magnitude(model).heads[0].clone()
        layer.position_bias.relative_position_bias_table[:, 1] += 3.0
    after = score_magnitude(model).heads[0]
    assert after[1] > before[1] and torch.equal(after[[0, 2, 3]], before[[0, 2, 3]])


# --------------------------------------------------------------------------- magnitude


def test_magnitude_equals_hand_computed_group_norms():
    model = tiny_classifier(qkv_bias=True)
    scores = score_magnitude(model, None)
    for layer in find_encoder_layers(model):
        attention = layer.attention
        for h in range(4):
            rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            parts = [attention.o_proj.weight[:, rows].flatten()]
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
                parts += [projection.weight[rows].flatten(), projection.bias[rows]]
            expected = torch.cat(parts).double().norm()
            assert scores.heads[layer.index][h].item() == pytest.approx(expected.item(), rel=1e-6)
        fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2
        for j in range(layer.num_neurons):
            expected = torch.cat([fc1.weight[j], fc1.bias[j : j + 1], fc2.weight[:, j]]).double().norm()
            assert scores.neurons[layer.index][j].item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_graph_criterion_scores_neurons_by_group_magnitude():
    """The stand-alone 'graph' criterion (not the gohsp method, whose neurons get its loss currency)."""
    model = tiny_classifier()
    graph, magnitude = score_graph(model, make_batches(1, 2)), score_magnitude(model)
    for a, b in zip(graph.neurons, magnitude.neurons):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- taylor


def test_taylor_matches_hand_computed_first_order_terms():
    model = tiny_classifier(qkv_bias=True)
    batches = make_batches(2, 3)
    scores = score_taylor(model, batches)
    layer = find_encoder_layers(model)[1]
    attention, rows = layer.attention, slice(HEAD_DIM, 2 * HEAD_DIM)  # head 1 of layer 1
    expected_head, expected_neuron = 0.0, 0.0
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        total = (attention.o_proj.weight[:, rows] * attention.o_proj.weight.grad[:, rows]).sum()
        for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
            total += (projection.weight[rows] * projection.weight.grad[rows]).sum()
            total += (projection.bias[rows] * projection.bias.grad[rows]).sum()
        expected_head += abs(total.item()) / len(batches)
        fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2
        neuron = (fc1.weight[5] * fc1.weight.grad[5]).sum() + fc1.bias[5] * fc1.bias.grad[5]
        neuron += (fc2.weight[:, 5] * fc2.weight.grad[:, 5]).sum()
        expected_neuron += abs(neuron.item()) / len(batches)
    model.zero_grad(set_to_none=True)
    assert scores.heads[1][1].item() == pytest.approx(expected_head, rel=1e-4)
    assert scores.neurons[1][5].item() == pytest.approx(expected_neuron, rel=1e-4)


def test_taylor_is_zero_exactly_for_units_cut_off_from_the_output():
    model = tiny_classifier()
    layer = find_encoder_layers(model)[1]
    with torch.no_grad():
        layer.attention.o_proj.weight[:, 0:HEAD_DIM] = 0.0  # head 0 writes nothing
        layer.mlp.fc2.weight[:, 7] = 0.0  # neuron 7 writes nothing
    scores = score_taylor(model, make_batches(2, 3))
    assert scores.heads[1][0].item() == 0.0
    assert scores.neurons[1][7].item() == 0.0
    assert (scores.heads[1][1:] > 0).all()
    assert (torch.cat([scores.neurons[1][:7], scores.neurons[1][8:]]) > 0).all()


def test_taylor_leaves_training_state_untouched_and_ignores_dropout():
    model = tiny_classifier(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model.train()
    layers = find_encoder_layers(model)
    layers[0].attention.q_proj.weight.requires_grad_(False)  # a frozen group parameter
    with_grad = layers[1].mlp.fc1.weight
    sentinel = torch.full_like(with_grad, 7.0)
    with_grad.grad = sentinel.clone()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    batches = make_batches(2, 3)

    first, second = score_taylor(model, batches), score_taylor(model, batches)
    for a, b in zip(first.heads + first.neurons, second.heads + second.neurons):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # eval mode: no dropout noise
    assert all(module.training for module in model.modules())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert torch.equal(with_grad.grad, sentinel)
    assert all(p.grad is None for p in model.parameters() if p is not with_grad)
    assert (first.heads[0] > 0).all()  # the frozen q_proj still counts


# --------------------------------------------------------------------------- random


def test_random_scores_are_reproducible_by_seed_and_leave_global_rng_alone():
    model = tiny_classifier()
    state = torch.get_rng_state()
    a = score_random(model, None, options=ImportanceOptions(seed=3))
    b = score_random(model, None, options=ImportanceOptions(seed=3))
    c = score_random(model, None, options=ImportanceOptions(seed=4))
    assert torch.equal(torch.get_rng_state(), state)
    for x, y in zip(a.heads + a.neurons, b.heads + b.neurons):
        assert torch.equal(x, y)
    assert not torch.equal(torch.cat(a.neurons), torch.cat(c.neurons))
    assert torch.cat(a.heads).min() >= 0 and torch.cat(a.heads).max() < 1


# --------------------------------------------------------------------------- registry and errors


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_shares_the_signature_and_returns_one_score_per_unit(name):
    model = tiny_classifier()
    batches = make_batches(1, 2) if name in REQUIRES_DATA else None
    scores = get_criterion(name)(model, batches, options=ImportanceOptions())
    assert isinstance(scores, UnitScores)
    scores.validate(model)
    assert all(t.dtype == torch.float64 and torch.isfinite(t).all() for t in scores.heads + scores.neurons)


def test_unknown_criterion_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown importance criterion 'l1'.*'graph', 'magnitude', 'random', 'taylor'"):
        get_criterion("l1")


@pytest.mark.parametrize("criterion", [score_graph, score_taylor])
def test_empty_or_missing_calibration_set_is_a_clear_error(criterion):
    model = tiny_classifier()
    with pytest.raises(ValueError, match="calibration set is empty"):
        criterion(model, [])
    with pytest.raises(ValueError, match="calibration set is empty"):
        criterion(model, iter(()))
    with pytest.raises(ValueError, match="needs calibration data but `batches` is None"):
        criterion(model, None)


def test_taylor_needs_labels_and_a_loss():
    model = tiny_classifier()
    with pytest.raises(ValueError, match="needs labels.*'labels' entry"):
        score_taylor(model, [{"pixel_values": torch.randn(2, 3, 16, 16)}])
    torch.manual_seed(0)
    backbone = ViTModel(tiny_config())
    with pytest.raises(ValueError, match="needs a loss.*ViTModel"):
        score_taylor(backbone, [{"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 1])}])


def test_unknown_edge_statistic_and_bad_options_are_clear_errors():
    model = tiny_classifier()
    with pytest.raises(ValueError, match="edge_statistic='correlation' is not a known edge statistic.*'output'"):
        ImportanceOptions(edge_statistic="correlation")
    with pytest.raises(ValueError, match="edge_statistic='maps' is not a known"):
        collect_head_statistics(model, make_batches(1, 2), "maps")
    with pytest.raises(ValueError, match="damping=1.5 is invalid"):
        ImportanceOptions(damping=1.5)
    with pytest.raises(ValueError, match="tolerance=0 is invalid"):
        ImportanceOptions(tolerance=0)
    with pytest.raises(ValueError, match="max_iterations=0 is invalid"):
        ImportanceOptions(max_iterations=0)
    with pytest.raises(ValueError, match="must be dicts of model inputs"):
        score_graph(model, [torch.randn(2, 3, 16, 16)])


# --------------------------------------------------------------------------- fisher and micro-batches


def test_fisher_squares_the_per_batch_first_order_terms_of_taylor():
    model = tiny_classifier(qkv_bias=True)
    batches = make_batches(3, 2)
    fisher = get_criterion("fisher")(model, batches)
    per_batch = [score_taylor(model, [batch]) for batch in batches]  # |sum w g| of one batch each
    for layer in range(3):
        expected_heads = sum(s.heads[layer] ** 2 for s in per_batch) / len(batches)
        expected_neurons = sum(s.neurons[layer] ** 2 for s in per_batch) / len(batches)
        torch.testing.assert_close(fisher.heads[layer], expected_heads)
        torch.testing.assert_close(fisher.neurons[layer], expected_neurons)
    assert "fisher" in REQUIRES_DATA


def test_micro_batches_give_one_gradient_per_piece():
    model = tiny_classifier()
    whole = make_batches(1, 6)
    pieces = [{key: value[start:start + 2] for key, value in whole[0].items()} for start in (0, 2, 4)]
    cut = score_taylor(model, whole, options=ImportanceOptions(micro_batch_size=2))
    reference = score_taylor(model, pieces)
    uncut = score_taylor(model, whole)
    for a, b, c in zip(cut.heads + cut.neurons, reference.heads + reference.neurons, uncut.heads + uncut.neurons):
        torch.testing.assert_close(a, b)
    assert not all(torch.allclose(a, c) for a, c in zip(cut.neurons, uncut.neurons))
    with pytest.raises(ValueError, match="micro_batch_size=0 is invalid"):
        ImportanceOptions(micro_batch_size=0)


# --------------------------------------------------------------------------- a personalised chain


def test_a_personalised_chain_credits_the_head_that_a_sensitive_head_reads():
    """Layer 1's head 0 matters for the loss (teleport weight 9) and reads layer 0's head 1; head 1 of layer 1
    (weight 1) reads layer 0's head 0. Layer 0's head 1 must get more mass, and the layer's total must not
    depend on the edges (only on the teleport and the damping)."""
    edges = [torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)]  # edges[0][i, j]: layer-0 i <-> layer-1 j
    stats = HeadGraphStatistics([2, 2], edges, 1)
    teleport = [torch.tensor([1.0, 1.0]), torch.tensor([9.0, 1.0])]
    pi = stationary_importance(stats, 0.85, teleport=teleport)
    assert pi[0][1] > 3 * pi[0][0]
    uniform = stationary_importance(stats, 0.85)
    torch.testing.assert_close(uniform[0][0], uniform[0][1])  # without the personalisation: a tie
    rewired = HeadGraphStatistics([2, 2], [torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)], 1)
    swapped = stationary_importance(rewired, 0.85, teleport=teleport)
    assert swapped[0][0] > 3 * swapped[0][1]  # the edges decide which layer-0 head gets the credit...
    torch.testing.assert_close(swapped[0].sum(), pi[0].sum())  # ...but not how much layer 0 holds
    with pytest.raises(ValueError, match="one non-negative weight per head"):
        stationary_importance(stats, 0.85, teleport=[torch.ones(3), torch.ones(2)])
