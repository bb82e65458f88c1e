"""Signal-propagation paper, experiments 4 and 5: SNIP without labels (``snip-unsupervised``) and
masks scored on another data set (``prune.dataset``), each checked against scores computed here by
hand, and the two experiment commands run end to end on real MNIST and Fashion-MNIST."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from sparsetrain import RunConfig, prune_at_init
from sparsetrain.cli.main import main
from sparsetrain.data import create_loaders
from sparsetrain.errors import SparsetrainError
from sparsetrain.masks import load_mask
from sparsetrain.pipeline import build, find_mask, validate
from sparsetrain.pruning import ScoreContext, method_spec
from sparsetrain.store import RunStore


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def _uniform_target_loss_by_hand(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the softmax against the uniform distribution, written out:
    mean over examples of -(1/C) sum_k log(exp(z_k) / sum_j exp(z_j))."""
    p = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    return -(torch.log(p).sum(dim=1) / logits.shape[1]).mean()


def _top(scores: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    flat = torch.cat([s.flatten() for s in scores.values()])
    cut = flat.sort(descending=True).values[keep - 1]
    return {n: s >= cut for n, s in scores.items()}


def test_unsupervised_scores_are_w_times_the_gradient_of_the_uniform_target_loss():
    model, x = _tiny(), torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    params = {n: p for n, p in model.named_parameters() if p.dim() > 1}
    grads = torch.autograd.grad(_uniform_target_loss_by_hand(model(x)), list(params.values()))
    expected = {n: (g * p).abs() for (n, p), g in zip(params.items(), grads)}
    ctx = ScoreContext(model, params, {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()},
                       [(x, None)], None, torch.Generator())
    got = method_spec("snip-unsupervised")(ctx, None)
    for n in params:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7)
    # and they are not the supervised scores (the loss really differs)
    sup = method_spec("snip")(ScoreContext(model, params, ctx.mask, [(x, torch.zeros(7, dtype=torch.long))], None,
                                           torch.Generator()), None)
    assert not torch.allclose(sup["0.weight"], got["0.weight"])
    mask = prune_at_init(model, "snip-unsupervised", sparsity=0.5, batches=(x, None))
    by_hand = _top(expected, 25)  # 50 weights, half kept
    assert {n: m.tolist() for n, m in mask.items()} == {n: m.tolist() for n, m in by_hand.items()}


class _DictModel(nn.Module):
    """A model called as model(**batch) that would fail if it were given the labels."""

    def __init__(self):
        super().__init__()
        self.net = _tiny()

    def forward(self, x, labels=None):
        assert labels is None, "the labels reached the model"
        return {"logits": self.net(x)}


def test_the_labels_are_not_read():
    model, x = _tiny(), torch.randn(10, 6, generator=torch.Generator().manual_seed(2))
    garbage = [None, torch.full((10,), 10 ** 6), torch.randn(10), torch.arange(3), "not labels"]
    masks = [prune_at_init(model, "snip-unsupervised", sparsity=0.7, batches=[(x, y)]) for y in garbage]
    for m in masks[1:]:
        assert all(torch.equal(m[n], masks[0][n]) for n in m)
    dict_model = _DictModel()
    with_labels = prune_at_init(dict_model, "snip-unsupervised", sparsity=0.7,
                                batches=[{"x": x, "labels": torch.full((10,), -5)}])
    assert all(torch.equal(with_labels["net." + n], masks[0][n]) for n in masks[0])
    # supervised SNIP does read them: a label out of range is refused
    with pytest.raises(SparsetrainError, match="class indices"):
        prune_at_init(model, "snip", sparsity=0.7, batches=[(x, torch.full((10,), 10 ** 6))])


def test_a_loss_fn_is_refused_by_the_unsupervised_method():
    model, x = _tiny(), torch.randn(4, 6)
    with pytest.raises(SparsetrainError, match="own label-free loss.*leave loss_fn out"):
        prune_at_init(model, "snip-unsupervised", sparsity=0.5, batches=(x, None), loss_fn=nn.functional.mse_loss)


def test_prune_dataset_is_left_out_of_the_key_until_set():
    plain = RunConfig()
    assert "dataset" not in plain.identity()["prune"]
    assert plain.replace(prune={"dataset": ""}).key() == plain.key()
    assert plain.replace(prune={"dataset": "fashion-mnist"}).key() != plain.key()
    assert plain.replace(prune={"method": "snip-unsupervised"}).key() != plain.key()


def test_prune_dataset_refused_where_it_means_nothing():
    base = RunConfig(dataset="synthetic").replace(train={"iterations": 1})
    for method, words in (("random", "scores without data"), ("dense", "prunes nothing"),
                          ("lottery", "trained network")):
        with pytest.raises(SparsetrainError, match=f"prune.dataset 'mnist'.*{words}"):
            validate(base.replace(prune={"dataset": "mnist", "method": method}))
    with pytest.raises(SparsetrainError, match="fashion-mnist"):
        validate(base.replace(prune={"dataset": "fashion_mnist"}))


def test_prune_dataset_scores_the_other_data_sets_first_batch(mnist_root):
    assert (mnist_root / "fashion-mnist").is_dir()
    config = RunConfig(model="lenet-300-100", dataset="mnist", seed=3).replace(
        prune={"sparsity": 0.9, "dataset": "fashion-mnist"}, train={"iterations": 1})
    built = build(config, data_dir=mnist_root, device="cpu")
    mask = find_mask(config, built)
    # by hand: the first training batch of Fashion-MNIST loaded as the run loads its own data
    other = create_loaders("fashion-mnist", batch_size=100, data_dir=mnist_root, download=False,
                           val_fraction=0.1, split_seed=0, shuffle_seed=3)
    x, y = next(other.train.iter_from(0))
    assert x.shape == (100, 1, 28, 28)
    model = built.model
    params = {n: p for n, p in model.named_parameters() if p.dim() > 1}
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(params.values()))
    scores = {n: (g * p).abs() for (n, p), g in zip(params.items(), grads)}
    expected = _top(scores, round(sum(p.numel() for p in params.values()) * 0.1))
    assert sum(int(m.sum()) for m in mask.values()) == sum(int(m.sum()) for m in expected.values())
    agree = sum(int((mask[n] == expected[n]).sum()) for n in mask) / sum(m.numel() for m in mask.values())
    assert agree > 0.9999  # float summation order may swap a near-tie at the cut
    own = find_mask(config.replace(prune={"dataset": ""}), built)
    assert sum(int((own[n] != mask[n]).sum()) for n in mask) > 1000  # MNIST's own mask is another one


def test_a_data_set_of_another_shape_is_refused(mnist_root):
    config = RunConfig(model="lenet-300-100", dataset="synthetic", data_args={"shape": [1, 14, 14]}).replace(
        prune={"sparsity": 0.9, "dataset": "mnist"}, train={"iterations": 1})
    built = build(config, data_dir=mnist_root, device="cpu")
    with pytest.raises(SparsetrainError, match=r"prune.dataset 'mnist' has inputs of shape \(1, 28, 28\) and 10 "
                                                r"classes, but the run trains on 'synthetic' with \(1, 14, 14\)"):
        find_mask(config, built)


def test_spp_unsupervised_command_end_to_end(tmp_path, mnist_root):
    out, store = tmp_path / "unsup.md", tmp_path / "store"
    cells = ["spp-unsupervised-lenet-300-100-95-snip", "spp-unsupervised-lenet-300-100-95-snip-unsupervised"]
    assert main(["reproduce", "spp-unsupervised", "--rows", *cells, "--seeds", "0", "--iterations", "5",
                 "--data-dir", str(mnist_root), "--store", str(store), "--out", str(out), "--no-progress"]) == 0
    text = out.read_text()
    assert "shortened" in text.splitlines()[0] and "| lenet-300-100 | 95% |" in text
    runs = {r.config["prune"]["method"]: r for r in RunStore(store).list()}
    assert set(runs) == {"snip", "snip-unsupervised"}
    a, b = (load_mask(store / "runs" / runs[m].key / "mask.safetensors") for m in ("snip", "snip-unsupervised"))
    kept = sum(int(a[n].sum()) for n in a)
    overlap = sum(int((a[n] & b[n]).sum()) for n in a) / kept
    row = json.loads((tmp_path / "unsup.json").read_text())["rows"]["lenet-300-100-95"]
    assert row["overlap"] == [pytest.approx(overlap)] and row["random_overlap"] == pytest.approx(0.05)
    assert 0.05 < overlap < 1.0  # more in common than chance, not the same mask
    assert (tmp_path / "unsup.png").read_bytes()[:4] == b"\x89PNG"


def test_spp_transfer_command_end_to_end(tmp_path, mnist_root):
    out, store = tmp_path / "transfer.md", tmp_path / "store"
    cells = ["spp-transfer-lenet-300-100-mnist-to-mnist", "spp-transfer-lenet-300-100-fashion-mnist-to-mnist"]
    assert main(["reproduce", "spp-transfer", "--rows", *cells, "--seeds", "0", "--iterations", "5",
                 "--data-dir", str(mnist_root), "--store", str(store), "--out", str(out), "--no-progress"]) == 0
    text = out.read_text()
    assert "| lenet-300-100 | mnist |" in text and "| lenet-300-100 | fashion-mnist |" not in text
    runs = RunStore(store).list()
    assert sorted((r.config["dataset"], r.config["prune"].get("dataset", "")) for r in runs) == [
        ("mnist", ""), ("mnist", "fashion-mnist")]
    assert (tmp_path / "transfer.png").read_bytes()[:4] == b"\x89PNG"
