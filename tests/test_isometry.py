"""Approximate isometry (sparsetrain.signal.isometry): checked against independent oracles, the
singular values of each kept matrix (torch.linalg.svdvals), the polar factor of a dense matrix
(torch.linalg.svd), and the original's plain SGD (lr 0.1) written out here; then the pipeline's
``prune.isometry`` stage end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from sparsetrain import RunConfig, run
from sparsetrain.cli.main import main
from sparsetrain.errors import SparsetrainError
from sparsetrain.pipeline import validate
from sparsetrain.signal.isometry import approximate_isometry_
from sparsetrain.store import RunStore


def random_mask(shape, density: float, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


def masked_layer(layer: nn.Module, density: float, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    layer.reset_parameters()
    mask = {"weight": random_mask(layer.weight.shape, density, seed + 1)}
    with torch.no_grad():
        layer.weight.mul_(mask["weight"])
    return layer, mask


def assert_near_isometry(matrix: torch.Tensor, atol: float = 0.05) -> None:
    """Every singular value of the matrix (min(rows, cols) of them) within ``atol`` of 1."""
    s = torch.linalg.svdvals(matrix.detach().double())
    assert float((s - 1).abs().max()) <= atol, s


def alive_fraction(weights: torch.Tensor, keep: torch.Tensor) -> float:
    """Kept weights at least 1% of their RMS: the test's own count of weights left alive."""
    kept = weights.detach()[keep]
    return float((kept.abs() >= 0.01 * kept.pow(2).mean().sqrt()).float().mean())


# --- the oracle: singular values of each kept matrix ------------------------------------------------

@pytest.mark.parametrize("layer, density", [
    (nn.Linear(64, 64), 0.6),        # square, 60% kept: 2,458 entries >= 64*65/2 constraints
    (nn.Linear(64, 32), 0.5),        # wide (32 x 64): rows orthonormal, W W^T = I
    (nn.Linear(16, 64), 0.5),        # tall (64 x 16): columns orthonormal, W^T W = I (the smaller side)
    (nn.Conv2d(8, 16, 3), 0.5),      # kernel read as (16, 8*3*3)
], ids=["square", "wide", "tall", "conv"])
def test_kept_matrix_singular_values_near_one_and_mask_unchanged(layer, density):
    layer, mask = masked_layer(layer, density)
    bias = layer.bias.detach().clone()
    report = approximate_isometry_(layer, mask)
    w = layer.weight.detach()
    assert_near_isometry(w.reshape(w.shape[0], -1))
    assert bool((w[~mask["weight"]] == 0).all())  # pruned entries exactly zero
    assert bool((w[mask["weight"]] != 0).all())  # and the kept ones still there
    assert torch.equal(layer.bias.detach(), bias)  # biases untouched
    assert report.layers[0].reachable and report.penalty_after < 1e-2


def test_fifty_percent_square_mask_reaches_the_target():
    """A 50%-sparse 64 x 64 random mask: 1,985 kept entries for this seed, just under the 2,080
    constraints of an exact isometry (64*65/2), so the report calls it unreachable; its singular
    values still come within 0.05 of 1."""
    layer, mask = masked_layer(nn.Linear(64, 64), 0.5, seed=3)
    report = approximate_isometry_(layer, mask, tol=1e-6)
    assert int(mask["weight"].sum()) == 1985 and not report.layers[0].reachable
    assert_near_isometry(layer.weight)
    assert bool((layer.weight.detach()[~mask["weight"]] == 0).all())


def test_realistic_layer_keeps_its_weights_alive():
    """MLP-7's first layer (100 x 784) at 90% sparsity, random layerwise mask: reachable (7,840
    kept >= 5,050), and the solution is not a partial permutation: > 90% of the kept weights stay
    alive (they are > 99% alive at initialization)."""
    layer, mask = masked_layer(nn.Linear(784, 100), 0.1)
    report = approximate_isometry_(layer, mask)
    assert_near_isometry(layer.weight)
    assert alive_fraction(layer.weight, mask["weight"]) > 0.9
    assert report.alive == pytest.approx(alive_fraction(layer.weight, mask["weight"]), abs=1e-6)
    assert 0 < report.layers[0].distance < 10


def test_pruned_units_leave_a_floor_that_is_reached():
    """Three output units of a 16 x 32 layer keep no weight (SNIP prunes whole units): their
    diagonal entries of W W^T stay 0, so ||W W^T - I||_F >= sqrt(3) whatever the weights; the
    other 13 rows can still be made orthonormal, so the optimum is exactly sqrt(3)."""
    layer, mask = masked_layer(nn.Linear(32, 16), 0.6)
    mask["weight"][[2, 7, 11]] = False
    with torch.no_grad():
        layer.weight.mul_(mask["weight"])
    report = approximate_isometry_(layer, mask)
    assert report.layers[0].floor == pytest.approx(3 ** 0.5) and not report.layers[0].reachable
    assert report.penalty_after == pytest.approx(3 ** 0.5, abs=1e-3)
    live = layer.weight.detach()[[i for i in range(16) if i not in (2, 7, 11)]]
    assert_near_isometry(live, atol=1e-3)


def test_dense_matrix_reaches_its_polar_factor():
    """Without a mask (fully kept) the nearest matrix with orthonormal rows is U V^T, the polar
    factor of the initial weights; the penalty's gradient flow keeps U and V, so the optimiser
    ends there, not at another orthogonal matrix."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 32)
    u, _, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    approximate_isometry_(layer, None, tol=1e-7)
    assert torch.allclose(layer.weight.detach().double(), u @ vh, atol=1e-3)


def test_matches_or_beats_the_originals_plain_sgd():
    """spp-public's optimiser, written out here: plain SGD (lr 0.1) on the sum over layers of
    ||(C W)^T (C W) - I||_F in TensorFlow's (in, out) layout, i.e. torch's W W^T (out x out),
    all layers at once. Ours reaches at most that penalty."""
    torch.set_num_threads(1)  # small matrices (the conftest fixture restores the count)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    mask = {"0.weight": random_mask((32, 64), 0.5, 1), "2.weight": random_mask((16, 32), 0.5, 2)}
    with torch.no_grad():
        for name, m in mask.items():
            net.get_parameter(name).mul_(m)
    reference = copy.deepcopy(net)
    weights = [reference.get_parameter(n) for n in mask]

    def penalty(ws):
        total = 0.0
        for w, c in zip(ws, mask.values()):
            tf = (w * c).T  # TensorFlow's (in, out)
            total = total + torch.linalg.matrix_norm(tf.T @ tf - torch.eye(tf.shape[1]))
        return total

    for _ in range(1000):
        loss = penalty(weights)
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            for w, g in zip(weights, grads):
                w -= 0.1 * g
    report = approximate_isometry_(net, mask)
    with torch.no_grad():
        sgd_penalty = float(penalty(weights))
        ours = float(penalty([net.get_parameter(n) for n in mask]))
    assert ours == pytest.approx(report.penalty_after, rel=1e-3, abs=1e-5)
    assert ours <= sgd_penalty


def test_sgd_method_is_the_originals_optimiser():
    """method="sgd" (per matrix, tol=0) takes the same steps as plain SGD lr 0.1 on the sum of
    the layers' norms, written out here with autograd (the sum's terms depend on one matrix each)."""
    torch.set_num_threads(1)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(20, 12), nn.Linear(12, 6))
    mask = {"0.weight": random_mask((12, 20), 0.6, 1), "1.weight": random_mask((6, 12), 0.6, 2)}
    with torch.no_grad():
        for name, m in mask.items():
            net.get_parameter(name).mul_(m)
    reference = [net.get_parameter(n).detach().clone().requires_grad_(True) for n in mask]
    for _ in range(10):  # before the penalty nears its floor, where SGD's fixed-size steps amplify rounding
        loss = sum(torch.linalg.matrix_norm((w * c) @ (w * c).T - torch.eye(w.shape[0]))
                   for w, c in zip(reference, mask.values()))
        grads = torch.autograd.grad(loss, reference)
        with torch.no_grad():
            for w, g in zip(reference, grads):
                w -= 0.1 * g
    approximate_isometry_(net, mask, method="sgd", steps=10, tol=0)
    for name, w in zip(mask, reference):
        assert torch.allclose(net.get_parameter(name).detach(), w.detach(), atol=1e-5)


def test_methods_agree_on_a_reachable_case():
    """polar and sgd (the original) optimise the same objective; on a reachable mask all three
    land near an isometry, L-BFGS the closest."""
    results = {}
    for method, steps in (("lbfgs", None), ("polar", 300), ("sgd", 3000)):
        layer, mask = masked_layer(nn.Linear(64, 32), 0.5)
        results[method] = approximate_isometry_(layer, mask, method=method, steps=steps).penalty_after
        assert bool((layer.weight.detach()[~mask["weight"]] == 0).all())
    assert results["lbfgs"] <= min(results["polar"], results["sgd"]) + 1e-6
    assert max(results.values()) < 0.5


def test_recurrent_weights_one_matrix_per_gate():
    torch.manual_seed(0)
    lstm = nn.LSTM(12, 16)
    mask = {n: random_mask(p.shape, 0.8, i) for i, (n, p) in enumerate(lstm.named_parameters()) if p.dim() == 2}
    report = approximate_isometry_(lstm, mask)
    assert [r.blocks for r in report.layers] == [4, 4]
    for gate in lstm.weight_hh_l0.detach().chunk(4):  # (16, 16) each: orthogonal
        assert_near_isometry(gate)
    for gate in lstm.weight_ih_l0.detach().chunk(4):  # (16, 12) each: orthonormal columns
        assert_near_isometry(gate)


def test_grouped_convolution_one_matrix_per_group_and_others_skipped():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 8), nn.Conv2d(8, 8, 3, groups=2))
    report = approximate_isometry_(net, {"0.weight": torch.ones(10, 8, dtype=torch.bool),
                                         "1.weight": torch.ones(8, 4, 3, 3, dtype=torch.bool)})
    assert "0.weight" in report.skipped and "Embedding" in report.skipped["0.weight"]
    w = net[1].weight.detach().reshape(8, -1)
    for group in w.chunk(2):  # (4, 36) each
        assert_near_isometry(group)


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "adam"}, "unknown approximate-isometry method 'adam'; choose one of lbfgs, polar, sgd"),
    ({"steps": 0}, "steps must be a positive whole number (got 0)"),
    ({"tol": -1.0}, "tol must be a finite number >= 0 (got -1.0)"),
    ({"tol": float("nan")}, "tol must be a finite number >= 0"),
])
def test_bad_arguments_are_refused(kwargs, words):
    layer, mask = masked_layer(nn.Linear(8, 4), 0.5)
    with pytest.raises(SparsetrainError, match=words.replace("(", r"\(").replace(")", r"\)")):
        approximate_isometry_(layer, mask, **kwargs)


def test_all_zero_kept_weights_are_refused_before_any_change():
    net = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4))
    nn.init.zeros_(net[1].weight)
    before = net[0].weight.detach().clone()
    with pytest.raises(SparsetrainError, match=r"kept weights of '1.weight' are all zero.*not 'zeros'"):
        approximate_isometry_(net, None)
    assert torch.equal(net[0].weight.detach(), before)


def test_mask_for_another_model_is_refused():
    with pytest.raises(SparsetrainError, match="not a parameter of the model"):
        approximate_isometry_(nn.Linear(4, 4), {"nope.weight": torch.ones(4, 4, dtype=torch.bool)})


# --- the pipeline stage ---------------------------------------------------------------------------

TINY = RunConfig(model="mlp-tiny", dataset="synthetic").replace(train={"iterations": 20})


def test_run_key_unchanged_without_the_flag():
    # the key of this config before prune.isometry existed (computed from the previous commit)
    assert TINY.key() == "2152f776554c7fd1"
    assert TINY.replace(prune={"isometry": True}).key() != TINY.key()


def test_run_with_isometry_records_its_report():
    outcome = run(TINY.replace(prune={"isometry": True, "sparsity": 0.5}), store=None, progress=False)
    iso = outcome.results["isometry"]
    assert iso["method"] == "lbfgs" and set(iso["layers"]) == {"1.weight", "3.weight"}
    assert iso["penalty_after"] < iso["penalty_before"] / 10
    plain = run(TINY.replace(prune={"sparsity": 0.5}), store=None, progress=False)
    assert "isometry" not in plain.results
    dense = run(TINY.replace(prune={"method": "dense", "isometry": True}), store=None, progress=False)
    assert dense.results["isometry"]["penalty_after"] < 1e-2  # no mask: every weight matrix, fully kept


def test_isometry_before_sparse_execution():
    """The stage runs before the pruned Linear layers become sparse ones, on the dense masked
    weights; the sparse run trains from them."""
    outcome = run(TINY.replace(prune={"isometry": True, "sparsity": 0.5}, train={"execution": "sparse"}),
                  store=None, progress=False)
    assert outcome.results["isometry"]["penalty_after"] < outcome.results["isometry"]["penalty_before"] / 10


def test_cli_isometry_flag(capsys, tmp_path):
    code = main(["run", "--model", "mlp-tiny", "--dataset", "synthetic", "--no-progress", "--iterations", "5",
                 "--sparsity", "0.5", "--isometry", "--store", str(tmp_path / "s")])
    capsys.readouterr()
    assert code == 0
    (record,) = RunStore(tmp_path / "s").list()
    assert record.config["prune"]["isometry"] is True
    assert record.results["isometry"]["penalty_after"] < record.results["isometry"]["penalty_before"]


def test_isometry_refused_for_pruning_after_training():
    with pytest.raises(SparsetrainError, match="prune.isometry does not apply to method 'lwc'"):
        validate(TINY.replace(prune={"method": "lwc", "isometry": True, "sparsity": 0.9}))
