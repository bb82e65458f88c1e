"""Effective sparsity (connections without a path from input to output) and FLOPs per layer,
against reachability computed independently (boolean matrix products in NumPy) and hand counts."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from sparsetrain.errors import SparsetrainError
from sparsetrain.inspect_run import _layer_lines
from sparsetrain.mask_stats import effective_mask, format_layer_rows, layer_costs
from sparsetrain.pipeline import layer_table
from sparsetrain.pruning import prune_at_init


def _random_mask(model, density, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters() if p.dim() > 1}


def _oracle_mlp(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Reachability by boolean matrix products: forward from every input, backward from every output."""
    fwd = [np.ones(masks[0].shape[1], dtype=bool)]
    for m in masks:
        fwd.append((m.astype(int) @ fwd[-1].astype(int)) > 0)
    bwd = [np.ones(masks[-1].shape[0], dtype=bool)]
    for m in reversed(masks):
        bwd.insert(0, (m.T.astype(int) @ bwd[0].astype(int)) > 0)
    # layer l's entry (o, i): kept, input i reached (fwd[l]), output o reaching (bwd[l + 1])
    return [m & fwd[l][None, :] & bwd[l + 1][:, None] for l, m in enumerate(masks)]


@pytest.mark.parametrize("seed", range(6))
def test_mlp_effective_entries_match_boolean_reachability(seed):
    model = nn.Sequential(nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(),
                          nn.Linear(5, 3))
    mask = _random_mask(model, 0.25, seed)
    names = list(mask)
    expected = _oracle_mlp([mask[n].numpy() for n in names])
    got = effective_mask(model, mask, (8,))
    for name, e in zip(names, expected):
        assert np.array_equal(got[name].numpy(), e), name
    costs = layer_costs(model, mask, (8,))
    for name, e in zip(names, expected):
        assert costs[name]["effective_sparsity"] == pytest.approx(1 - e.sum() / e.size)


def test_hand_example_a_unit_without_inputs_kills_its_outgoing_connections():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    mask = {"1.weight": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool),
            "3.weight": torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool)}
    # Hidden 1 has no input: 3.weight's two entries from it are dead. Hidden 2 leads nowhere: the
    # entry into it (1.weight[2, 2]) is dead. Left: 1.weight[0, 0:2] and 3.weight[0, 0].
    costs = layer_costs(model, mask, (1, 2, 2))
    assert costs["1.weight"]["effective_sparsity"] == pytest.approx(1 - 2 / 12)
    assert costs["3.weight"]["effective_sparsity"] == pytest.approx(1 - 1 / 6)
    assert costs["1.weight"]["flops"] == 12 and costs["1.weight"]["flops_kept"] == 3
    assert costs["1.bias"] == {"flops": None, "flops_kept": None, "effective_sparsity": None}


class _ConvNet(nn.Module):
    def __init__(self, norm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)  # 6x6 -> 4x4 (no padding: a reached channel is positive everywhere)
        self.bn = nn.BatchNorm2d(3) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(3, 4, 3)  # -> 2x2
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = nn.functional.relu(self.conv2(h))
        return self.fc(h.flatten(1))


def _oracle_conv(m1, m2, m3):
    a1, a2 = m1.any(axis=(2, 3)), m2.any(axis=(2, 3))  # channel adjacency (out, in)
    f1 = a1[:, 0]  # conv1's output channels reached from the one input channel
    f2 = (a2.astype(int) @ f1.astype(int)) > 0
    feat = np.repeat(f2, 4)  # flatten: feature j is channel j // 4
    b3 = np.ones(3, dtype=bool)
    bf = (m3.T.astype(int) @ b3.astype(int)) > 0
    b2 = bf.reshape(4, 4).any(axis=1)
    b1 = (a2.T.astype(int) @ b2.astype(int)) > 0
    e1 = m1 & b1[:, None, None, None]
    e2 = m2 & f1[None, :, None, None] & b2[:, None, None, None]
    e3 = m3 & feat[None, :] & b3[:, None]
    return e1, e2, e3


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("norm", [False, True])
def test_conv_effective_entries_are_channel_level_reachability(seed, norm):
    model = _ConvNet(norm)
    if norm:  # statistics of a trained network must not change the graph
        model.bn.running_mean.fill_(5.0)
        model.bn.running_var.fill_(0.01)
    mask = _random_mask(model, 0.12, seed)
    expected = _oracle_conv(*(mask[n].numpy() for n in ("conv1.weight", "conv2.weight", "fc.weight")))
    got = effective_mask(model, mask, (1, 6, 6))
    for name, e in zip(("conv1.weight", "conv2.weight", "fc.weight"), expected):
        assert np.array_equal(got[name].numpy(), e), name


def test_a_residual_connection_carries_reach_around_a_pruned_block():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            return self.head(h + self.fc2(h))

    fc1 = torch.ones(4, 4, dtype=torch.bool)
    fc1[3] = False  # unit 3 has no input
    fc2 = torch.zeros(4, 4, dtype=torch.bool)
    fc2[0, 3] = True  # the block's only connection starts at unit 3: dead
    mask = {"fc1.weight": fc1, "fc2.weight": fc2, "head.weight": torch.ones(2, 4, dtype=torch.bool)}
    costs = layer_costs(Res(), mask, (4,))
    assert costs["fc1.weight"]["effective_sparsity"] == pytest.approx(0.25)  # units 0-2 reach the head by the skip
    assert costs["fc2.weight"]["effective_sparsity"] == pytest.approx(1.0)
    assert costs["head.weight"]["effective_sparsity"] == pytest.approx(0.25)  # its column from unit 3


def test_flops_per_example_for_linear_conv_grouped_and_sequence_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2),
                          nn.Flatten(), nn.Linear(54, 5))
    mask = _random_mask(model, 0.3, 0)
    costs = layer_costs(model, mask, (3, 9, 9))
    # conv 1: 5x5 outputs x (4 * 3 * 3 * 3) kernel entries; conv 2: 3x3 outputs x (6 * 2 * 3 * 3);
    # linear: 5 * 54
    assert costs["0.weight"]["flops"] == 25 * 108
    assert costs["0.weight"]["flops_kept"] == 25 * int(mask["0.weight"].sum())
    assert costs["2.weight"]["flops"] == 9 * 108 and costs["2.weight"]["flops_kept"] == 9 * int(mask["2.weight"].sum())
    assert costs["4.weight"]["flops"] == 270 and costs["4.weight"]["flops_kept"] == int(mask["4.weight"].sum())
    seq = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Conv1d(7, 2, 3))  # (7 steps, 6) -> (7, 4) -> conv over 4
    costs = layer_costs(seq, None, (7, 6))
    assert costs["0.weight"]["flops"] == 7 * 24 == costs["0.weight"]["flops_kept"]  # one position per step
    assert costs["2.weight"]["flops"] == 2 * 42  # 2 output positions x 2 * 7 * 3 entries


@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_models_have_flops_per_step_and_no_effective_sparsity(batch_first):
    class Rnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(5, 4, num_layers=2, batch_first=batch_first), nn.Linear(4, 3)

        def forward(self, x):
            out = self.lstm(x if batch_first else x.transpose(0, 1))[0]
            return self.fc(out[:, -1] if batch_first else out[-1])

    model = Rnn()
    mask = prune_at_init(model, "random", sparsity=0.5)
    assert effective_mask(model, mask, (6, 5)) is None
    costs = layer_costs(model, mask, (6, 5))
    assert costs["fc.weight"]["flops"] == 12 and costs["fc.weight"]["effective_sparsity"] is None
    # 6 time steps, every gate at once: weight_ih_l0 is (16, 5), weight_hh_l* and weight_ih_l1 (16, 4)
    for name, entries in [("weight_ih_l0", 16 * 5), ("weight_hh_l0", 16 * 4), ("weight_ih_l1", 16 * 4)]:
        kept = int(mask[f"lstm.{name}"].sum())
        assert costs[f"lstm.{name}"] == {"flops": 6 * entries, "flops_kept": 6 * kept, "effective_sparsity": None}
    assert costs["lstm.bias_ih_l0"]["flops"] is None


def test_a_bad_input_shape_is_refused():
    with pytest.raises(SparsetrainError, match=r"input_shape must be one example's shape.*got \(0, 3\)"):
        layer_costs(nn.Linear(3, 2), None, (0, 3))


def test_layer_table_adds_the_three_keys_and_keeps_the_old_ones():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    mask = prune_at_init(model, "magnitude", sparsity=0.5)
    old = layer_table(mask, model)
    assert set(old["1.weight"]) == {"shape", "kept", "total", "sparsity"}  # without an input shape: as before
    table = layer_table(mask, model, (1, 2, 2))
    for name, row in table.items():
        assert {k: row[k] for k in old[name]} == old[name]
        assert {"flops", "flops_kept", "effective_sparsity"} <= set(row)
    assert table["1.weight"]["flops"] == 12 and table["1.bias"]["flops"] is None
    dense = layer_table(None, model, (1, 2, 2))
    assert dense["3.weight"]["flops_kept"] == 6 and dense["3.weight"]["effective_sparsity"] == 0.0


def test_old_records_without_the_new_keys_still_print():
    new = {"fc.weight": {"shape": [3, 4], "kept": 6, "total": 12, "sparsity": 0.5, "flops": 12_000,
                         "flops_kept": 6_000, "effective_sparsity": 0.75}}
    old = {"fc.weight": {"shape": [3, 4], "kept": 6, "total": 12, "sparsity": 0.5}}
    assert "12.0k" in "\n".join(_layer_lines(new)) and "75.00%" in "\n".join(_layer_lines(new))
    old_line = _layer_lines(old)[-1]
    assert "50.00%" in old_line and old_line.split()[-3:] == ["-", "-", "-"]
    assert "96.00%" in _layer_lines({"fc1.weight": 0.96})[-1]  # the earliest records: the sparsity alone
    rows = format_layer_rows([{"name": "fc.weight", **old["fc.weight"]}]).splitlines()
    assert rows[1].split() == ["fc.weight", "6", "12", "50.00%", "-", "-", "-"]


def test_prune_and_run_print_flops_and_effective_sparsity(capsys, tmp_path):
    import re

    from safetensors.torch import load_file

    from sparsetrain.cli.main import main

    tiny = ["--dataset", "synthetic", "--model", "mlp-tiny", "--no-progress", "--store", tmp_path / "store"]
    out_file = tmp_path / "m.safetensors"
    assert main([str(a) for a in ["prune", *tiny, "--sparsity", "0.995", "--out", out_file]]) == 0
    out = capsys.readouterr().out
    saved = load_file(str(out_file))
    masks = [saved["1.weight"].bool().numpy(), saved["3.weight"].bool().numpy()]
    expected = _oracle_mlp(masks)
    for name, m, e in zip(("1.weight", "3.weight"), masks, expected):
        row = re.search(rf"^{re.escape(name)}\s+(\S+)\s+(\S+)\s+([\d.]+)%$", out, re.M)
        assert row, out
        assert row[1] == {"1.weight": "25.1k", "3.weight": "320"}[name]  # 784 * 32 and 32 * 10 per example
        assert float(row[3]) == pytest.approx(100 * (1 - e.sum() / e.size), abs=0.005)
    # layerwise at 90%: kappa = round(25408 * 0.1) = 2541, budgets 2508.8 and 32.0 -> 2509 and 32
    assert main([str(a) for a in ["run", *tiny, "--sparsity", "0.9", "--scope", "layerwise", "--iterations", "2",
                                  "--val-every", "0", "--checkpoint-every", "0"]]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^layer\s+kept\s+total\s+sparsity\s+flops\s+kept\s+effective$", out, re.M)
    assert re.search(r"^1\.weight\s+2509\s+25088\s+90\.00%\s+25\.1k\s+2\.5k\s+[\d.]+%$", out, re.M), out
    assert re.search(r"^3\.weight\s+32\s+320\s+90\.00%\s+320\s+32\s+[\d.]+%$", out, re.M), out
