"""Structured selection (N:M and blocks), checked against loop-based oracles on small tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from sparsetrain import SparsetrainError, prune_at_init
from sparsetrain.cli.main import build_parser, main
from sparsetrain.cli.common import config_from_args
from sparsetrain.config import RunConfig
from sparsetrain.masks import prunable_parameters
from sparsetrain.pruning import connection_sensitivity, parse_structure, select_structured
from sparsetrain.pruning.select import kept_count
from sparsetrain.pruning.structured import NM, Blocks, StructureWarning
from sparsetrain.run import run, validate

# Linear (out, in) and Conv (out, in, kh, kw) weights whose rows (in, in*kh*kw) are 16 or 24 long.
NM_SHAPES = [(6, 16), (3, 24), (4, 2, 2, 4), (5, 4, 2, 3)]
# Shapes whose 2-D views (rows, in*kh*kw) leave smaller edge tiles for 3x4 and 2x5 blocks.
BLOCK_SHAPES = [(7, 10), (5, 2, 3, 3), (2, 3), (9, 20)]


def scores_of(shape, ties: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties inside groups and between tiles
        return torch.randint(0, 3, shape, generator=g).double()
    return torch.rand(shape, generator=g, dtype=torch.float64)


def nm_oracle(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows = scores.reshape(scores.shape[0], -1).tolist()
    keep = []
    for row in rows:
        out = [False] * len(row)
        for start in range(0, len(row), m):
            group = list(range(start, start + m))
            for j in sorted(group, key=lambda j: (-row[j], j))[:n]:  # highest, then first
                out[j] = True
        keep.append(out)
    return torch.tensor(keep).reshape(scores.shape)


def tiles(shape, rows, cols):
    """(tile index in row-major order, list of element (r, c) of the 2-D view)."""
    r, c = shape[0], int(torch.Size(shape).numel()) // shape[0]
    out = []
    for i in range(0, r, rows):
        for j in range(0, c, cols):
            out.append([(a, b) for a in range(i, min(i + rows, r)) for b in range(j, min(j + cols, c))])
    return out


def block_oracle(scores: dict[str, torch.Tensor], rows, cols, sparsity, scope="global"):
    groups = [list(scores)] if scope == "global" else [[n] for n in scores]
    mask = {}
    for names in groups:
        candidates = []  # (-sum, order, name, elements)
        for n in names:
            view = scores[n].reshape(scores[n].shape[0], -1).tolist()
            for elements in tiles(tuple(scores[n].shape), rows, cols):
                total = sum(view[a][b] for a, b in elements)
                candidates.append((-total, len(candidates), n, elements))
        kappa = max(1, round(len(candidates) * (1 - sparsity)))
        for n in names:
            mask[n] = [[False] * (scores[n].numel() // scores[n].shape[0]) for _ in range(scores[n].shape[0])]
        for _, _, n, elements in sorted(candidates)[:kappa]:
            for a, b in elements:
                mask[n][a][b] = True
    return {n: torch.tensor(m).reshape(scores[n].shape) for n, m in mask.items()}


def assert_blocky(mask: torch.Tensor, rows, cols):
    view = mask.reshape(mask.shape[0], -1)
    for elements in tiles(tuple(mask.shape), rows, cols):
        values = {bool(view[a, b]) for a, b in elements}
        assert len(values) == 1, "a tile is partly kept"


# --- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("2:4", NM(2, 4)), (" 1 : 4 ", NM(1, 4)), ("4:8", NM(4, 8)), ("block32x32", Blocks(32, 32)),
     ("Block64X16", Blocks(64, 16)), ("", None), (None, None)],
)
def test_parse_structure(text, expected):
    assert parse_structure(text) == expected
    if expected is not None:
        assert parse_structure(str(expected)) == expected  # round trip


@pytest.mark.parametrize(
    "text, message",
    [("3:2", "0 < N < M"), ("4:4", "0 < N < M"), ("0:4", "0 < N < M"), ("block0x4", "at least 1x1"),
     ("block4x0", "at least 1x1"), ("blocky", "valid forms"), ("block32", "valid forms"),
     ("2:4:8", "valid forms"), ("2/4", "valid forms"), ("-1:4", "valid forms"), ("a:b", "valid forms")],
)
def test_bad_structure_strings_are_explained(text, message):
    with pytest.raises(SparsetrainError, match=message):
        parse_structure(text)


# --- N:M ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("shape", NM_SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_nm_keeps_the_top_n_of_every_m_along_rows(n, m, shape, ties):
    s = scores_of(shape, ties, seed=n * 10 + m)
    mask = select_structured({"w": s}, f"{n}:{m}")["w"]
    assert mask.dtype == torch.bool and mask.shape == s.shape
    groups = mask.reshape(shape[0], -1, m)
    assert (groups.sum(-1) == n).all(), "every group of M keeps exactly N"
    assert torch.equal(mask, nm_oracle(s, n, m))


def test_nm_ties_go_to_the_first_entries_of_a_group():
    mask = select_structured({"w": torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.0, 2.0]])}, "2:4")["w"]
    assert mask.tolist() == [[True, True, False, False, False, True, False, True]]


@pytest.mark.parametrize("structure", ["2:4", "1:4", "4:8"])
def test_prune_at_init_nm_on_linear_and_conv_matches_the_oracle_on_snip_scores(structure):
    n, m = map(int, structure.split(":"))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    model.double()
    batch = (torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,)))
    mask = prune_at_init(model, "snip", batches=batch, structure=structure)
    scores = connection_sensitivity(model, prunable_parameters(model), [batch], F.cross_entropy)
    # rows: conv 2*2*2 = 8, linears 64 and 8 long: every weight takes 1:4, 2:4 and 4:8
    assert set(mask) == set(scores) == {"0.weight", "3.weight", "5.weight"}
    for name, s in scores.items():
        assert torch.equal(mask[name], nm_oracle(s, n, m)), name
        assert int(mask[name].sum()) == s.numel() * n // m


def test_nm_sparsity_is_fixed_by_the_structure():
    model = nn.Linear(8, 4)
    for given in (None, 0.5, 0.5000000001):
        mask = prune_at_init(model, "magnitude", sparsity=given, structure="2:4")
        assert int(mask["weight"].sum()) == 16
    with pytest.raises(SparsetrainError, match=r"2:4 keeps 2 of every 4.*sparsity of 0.5.*got sparsity=0.9"):
        prune_at_init(model, "magnitude", sparsity=0.9, structure="2:4")
    with pytest.raises(SparsetrainError, match="sparsity must be a fraction"):
        prune_at_init(model, "magnitude", structure="block2x2")  # blocks need a sparsity


def test_nm_leaves_biases_and_rows_of_other_lengths_dense():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))  # rows of 6: not a multiple of 4
    with pytest.warns(StructureWarning, match=r"0\.weight \(8, 6\) is left dense.*multiple of 4"):
        mask = prune_at_init(model, "random", structure="2:4", include_biases=True)
    assert mask["0.weight"].all() and mask["0.bias"].all() and mask["1.bias"].all()
    assert int(mask["1.weight"].sum()) == 16
    with pytest.raises(SparsetrainError, match="none of the pruned parameters"):
        prune_at_init(model, "random", structure="2:4", params=["0.weight", "1.bias"])


# --- blocks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", [(3, 4), (2, 5), (1, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.97])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_block_masks_are_blocky_and_keep_the_top_tiles(rows, cols, sparsity, ties, scope):
    scores = {f"p{i}": scores_of(shape, ties, seed=i) for i, shape in enumerate(BLOCK_SHAPES)}
    mask = select_structured(scores, f"block{rows}x{cols}", sparsity, scope)
    expected = block_oracle(scores, rows, cols, sparsity, scope)
    for name in scores:
        assert_blocky(mask[name], rows, cols)
        assert torch.equal(mask[name], expected[name]), name
    counts = {n: len(tiles(tuple(s.shape), rows, cols)) for n, s in scores.items()}
    kept_tiles = {n: sum(bool(mask[n].reshape(s.shape[0], -1)[e[0]]) for e in tiles(tuple(s.shape), rows, cols))
                  for n, s in scores.items()}
    if scope == "global":
        assert sum(kept_tiles.values()) == kept_count(sum(counts.values()), sparsity)
    else:
        assert all(kept_tiles[n] == kept_count(counts[n], sparsity) for n in scores)


@pytest.mark.parametrize("method", ["snip", "random", "magnitude"])
def test_prune_at_init_blocks_with_every_method(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    batch = (torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,)))
    mask = prune_at_init(model, method, sparsity=0.75, batches=batch, structure="block4x8", include_biases=True)
    # conv (8, 27): 2 x 4 tiles; linear (10, 128): 3 x 16 tiles; 56 tiles, 14 kept
    assert mask["0.bias"].all() and mask["3.bias"].all()
    kept = 0
    for name in ("0.weight", "3.weight"):
        assert_blocky(mask[name], 4, 8)
        kept += sum(bool(mask[name].reshape(mask[name].shape[0], -1)[e[0]])
                    for e in tiles(tuple(mask[name].shape), 4, 8))
    assert kept == 14


# --- config, run, CLI -----------------------------------------------------------------------------


def tiny(**prune) -> RunConfig:
    return RunConfig(model="mlp-tiny", dataset="synthetic", name="tiny").replace(
        prune=prune, train={"iterations": 4, "val_every": 2, "checkpoint_every": 2}
    )


def test_run_with_2_4_structure_records_half_sparse_layers(tmp_path):
    config = tiny(sparsity=0.5, structure="2:4")
    outcome = run(config, store=tmp_path / "store", progress=False)
    layers = {n: v for n, v in outcome.layer_sparsity.items() if "left_out" not in v}  # biases: left dense
    assert set(layers) == {"1.weight", "3.weight"}  # mlp-tiny: (32, 784) and (10, 32)
    for row in layers.values():
        assert row["sparsity"] == 0.5 and row["kept"] * 2 == row["total"]
    assert outcome.results["sparsity"] == 0.5
    mask = load_file(str(tmp_path / "store" / "runs" / outcome.key / "mask.safetensors"))
    assert (mask["1.weight"].reshape(32, -1, 4).sum(-1) == 2).all()
    assert config.key() != tiny(sparsity=0.5).key()  # the structure is part of the run's identity
    assert RunConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "prune, message",
    [({"sparsity": 0.9, "structure": "2:4"}, "sparsity of 0.5"), ({"structure": "blocky"}, "valid forms")],
)
def test_validate_rejects_bad_structures_before_reading_data(prune, message):
    with pytest.raises(SparsetrainError, match=message):
        validate(tiny(**prune))
    validate(tiny(method="dense", sparsity=0.9, structure="2:4"))  # dense: nothing to structure


def test_cli_structure_flag(tmp_path, capsys):
    args = build_parser().parse_args(["run", "--structure", "block8x8", "--sparsity", "0.9"])
    assert config_from_args(args).prune.structure == "block8x8"
    out = tmp_path / "mask.safetensors"
    tiny_flags = ["--dataset", "synthetic", "--model", "mlp-tiny", "--no-progress"]
    assert main(["prune", *tiny_flags, "--structure", "2:4", "--sparsity", "0.5", "--out", str(out)]) == 0
    assert (load_file(str(out))["3.weight"].reshape(10, -1, 4).sum(-1) == 2).all()
    assert main(["prune", *tiny_flags, "--structure", "2:4", "--out", str(out)]) == 2  # default 0.95
    assert "sparsity=0.5" in capsys.readouterr().err
