"""``reproduce snip-visualize``: the per-pixel counts of surviving first-layer connections (SNIP
paper, Figure 2), checked against SNIP scored by hand and against what one image implies."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.data import load_dataset, preprocess
from sparsetrain.errors import SparsetrainError
from sparsetrain.experiments import EXPERIMENTS, ReproduceOptions
from sparsetrain.experiments.snip_visualize import INIT, MODEL, compute_maps, plot_maps
from sparsetrain.init import initialize_
from sparsetrain.models import create_model


def hand_snip_map(x, y, sparsity, seed):
    """SNIP by hand: |dL/dp * p| for every weight and bias, the top round(m (1 - s)) over all of
    them, and the first layer's kept entries counted per input pixel."""
    model = initialize_(create_model(MODEL, input_shape=(1, 28, 28), num_classes=10), INIT, seed)
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    scores = [(g * p).abs().detach() for g, p in zip(grads, params)]
    flat = torch.cat([s.flatten() for s in scores])
    kappa = round(flat.numel() * (1 - sparsity))
    threshold = flat.topk(kappa).values[-1]
    first = scores[0] >= threshold  # model[1].weight, (300, 784): the first parameter
    assert first.shape == (300, 784)
    return first.sum(dim=0).reshape(28, 28)


def test_counts_match_snip_by_hand_and_trace_the_image(mnist_root, tmp_path):
    maps = compute_maps("mnist", classes=[0, 1], batch_sizes=[10], sparsity=0.95, seed=0, data_dir=mnist_root)
    raw = load_dataset("mnist", mnist_root)
    train_x, _, _, _ = preprocess(raw)
    for c in (0, 1):
        i = int((raw.train_y == c).nonzero()[0])
        assert maps.first_images[c] == i
        expected = hand_snip_map(train_x[i:i + 1], raw.train_y[i:i + 1], 0.95, 0)
        assert torch.equal(maps.per_class[c], expected)
        # One image: a connection's score is proportional to its pixel's |standardised value|;
        # stroke pixels (raw >= 128, |x| about 2.8 for MNIST) keep far more than the background
        # (raw 0, |x| about 0.42).
        pixels = raw.train_x[i, 0]
        stroke = maps.per_class[c][pixels >= 128].float().mean()
        background = maps.per_class[c][pixels == 0].float().mean()
        assert stroke > 4 * background, (c, float(stroke), float(background))
    assert maps.per_batch[10].shape == (28, 28)
    assert int(maps.per_batch[10].sum()) > 0
    png = plot_maps(maps, tmp_path / "maps.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def options(tmp_path, **kw):
    return ReproduceOptions(out=tmp_path / "v.md", store=tmp_path / "store", **kw)


def test_reproduce_refuses_iterations_and_unknown_data_sets(tmp_path):
    run = EXPERIMENTS.get("snip-visualize")
    with pytest.raises(SparsetrainError, match="trains nothing"):
        run(options(tmp_path, iterations=100))
    with pytest.raises(SparsetrainError, match="rows are data sets: mnist, fashion-mnist"):
        run(options(tmp_path, rows=("cifar10",)))
    assert not Path(tmp_path / "v.md").exists()


def test_reproduce_writes_markdown_json_and_png(mnist_root, tmp_path, monkeypatch):
    from sparsetrain.experiments import snip_visualize

    monkeypatch.setattr(snip_visualize, "BATCH_SIZES", (10,))
    run = EXPERIMENTS.get("snip-visualize")
    run(options(tmp_path, rows=("mnist",), seeds=(0,), data_dir=str(mnist_root)))
    text = (tmp_path / "v.md").read_text()
    assert "![mnist: surviving first-layer connections per pixel](v_mnist.png)" in text
    assert "Command:" in text
    assert (tmp_path / "v_mnist.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "v.json").exists()


def test_cli_refuses_iterations_with_exit_2(capsys, tmp_path):
    from sparsetrain.cli.main import main

    code = main(["reproduce", "snip-visualize", "--iterations", "5", "--store", str(tmp_path / "s"),
                 "--out", str(tmp_path / "v.md")])
    assert code == 2 and "trains nothing" in capsys.readouterr().err
    assert not (tmp_path / "v.md").exists()


def test_full_disk_keeps_the_previous_report(mnist_root, tmp_path, monkeypatch):
    from sparsetrain import fsio
    from sparsetrain.experiments import snip_visualize

    monkeypatch.setattr(snip_visualize, "BATCH_SIZES", (10,))
    (tmp_path / "v.md").write_text("old\n")
    run = EXPERIMENTS.get("snip-visualize")
    # the PNG is the first report write and succeeds; the Markdown and JSON after it fail
    with fsio.simulate_full_disk("report", after=1), pytest.raises(SparsetrainError, match="cannot write the report"):
        run(options(tmp_path, rows=("mnist",), seeds=(0,), data_dir=str(mnist_root)))
    assert (tmp_path / "v.md").read_text() == "old\n"
    assert not list(tmp_path.glob(".*.tmp"))
