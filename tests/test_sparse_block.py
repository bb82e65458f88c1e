"""Block-sparse (BSR) and 2:4 semi-structured layouts: equal to the dense masked layer (F.linear /
F.conv2d with the masked weight as the oracle), block detection, conversion, files, report, errors.
The 2:4 kernels and BSR on CUDA need a GPU: those tests are skipped without one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain.errors import SparsetrainError
from sparsetrain.pruning.structured import nm_mask
from sparsetrain.sparse import (
    BlockMatrix,
    SparseBlockConv2d,
    SparseBlockLinear,
    SparseSemiStructuredLinear,
    clear_choice_cache,
    detect_block_size,
    format_sparse_report,
    load_sparse,
    save_sparse,
    semi_structured_problem,
    sparse_report,
    to_sparse,
)
from sparsetrain.sparse import convert as convert_module
from sparsetrain.sparse.block import compress_2to4, decompress_2to4, is_2to4
from sparsetrain.state_io import load_tensors, save_tensors

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def block_snip(out_features=256, in_features=512, structure="block32x32", sparsity=0.9, seed=0):
    """One Linear (in -> out) and its SNIP mask with ``structure``, scored on a random batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, out_features)).eval()
    x, y = torch.randn(64, in_features), torch.randint(0, out_features, (64,))
    mask = st.prune_at_init(model, "snip", sparsity=sparsity, batches=(x, y), structure=structure)
    return model, mask, x


def tile_mask(shape, r, density, seed=0) -> torch.Tensor:
    """An exact block mask: each r x r tile kept with probability ``density``."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape[0] // r, shape[1] // r, generator=g) < density
    return keep.repeat_interleave(r, 0).repeat_interleave(r, 1)


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("r", [8, 16, 32, 64])
def test_detect_block_size_finds_exact_blocks(r):
    m = tile_mask((256, 512), r, 0.2, seed=r)
    assert detect_block_size(m.float()) == (r, r)
    # zeros inside the kept tiles (30% of them) still fit the 2x bound
    holes = torch.rand(m.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    assert detect_block_size((m & ~holes).float()) == (r, r)


def test_detect_block_size_rejects_unstructured_and_odd_shapes():
    g = torch.Generator().manual_seed(0)
    assert detect_block_size((torch.rand(256, 512, generator=g) < 0.1).float()) is None
    assert detect_block_size(torch.ones(100, 60)) is None  # no size divides both dimensions
    # the 2x bound, at its edge: one 8x8 tile holding 32 nonzeros qualifies, with 31 it does not
    w = torch.zeros(64, 64)
    tile = torch.zeros(8, 8)
    tile.view(-1)[:32] = 1.0
    w[8:16, 24:32] = tile
    assert detect_block_size(w) == (8, 8)
    w[11, 31] = 0.0  # the last of the 32
    assert detect_block_size(w) is None


def test_detect_block_size_on_a_snip_block_mask():
    _, mask, _ = block_snip()
    m = mask["0.weight"]
    assert abs(1 - m.float().mean().item() - 0.9) < 0.01
    assert detect_block_size(m.float()) == (32, 32)


# ----------------------------------------------------------------------------- BSR modules


def test_bsr_linear_equals_dense_masked():
    model, mask, x = block_snip()
    layer = st.apply_mask_(copy.deepcopy(model), mask)[0]
    w, b = layer.weight.detach(), layer.bias.detach()
    sparse = SparseBlockLinear.from_dense(layer)
    assert sparse.block == (32, 32)
    assert sparse.crow_indices.dtype == sparse.col_indices.dtype == torch.int32
    assert sparse.values.shape == (int(mask["0.weight"].sum()) // 1024, 32, 32)
    assert torch.equal(sparse.matrix.to_dense(), w)
    with torch.no_grad():
        out = sparse(x)
        assert out.shape == (64, 256) and out.stride() == (1, 64)  # a transposed view, as SparseLinear's
        assert rel_err(out, F.linear(x, w, b)) <= 1e-5
        assert rel_err(sparse(x.t().contiguous().t()), F.linear(x, w, b)) <= 1e-5  # transposed input
        x3 = torch.randn(2, 5, 512)
        assert rel_err(sparse(x3), F.linear(x3, w, b)) <= 1e-5
        assert rel_err(sparse(x[0]), F.linear(x[0], w, b)) <= 1e-5  # one example, 1-D
        no_bias = SparseBlockLinear(BlockMatrix.from_dense(w, (32, 32)))
        assert rel_err(no_bias(x), F.linear(x, w)) <= 1e-5
        empty = SparseBlockLinear(BlockMatrix.from_dense(torch.zeros(64, 32), (16, 16)), torch.ones(64))
        assert torch.equal(empty(torch.randn(3, 32)), torch.ones(3, 64))


def test_bsr_conv_equals_conv_including_groups():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    x, y = torch.randn(4, 16, 8, 8), torch.randint(0, 10, (4,))
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(32 * 64, 10)).eval()
    mask = st.prune_at_init(model, "snip", sparsity=0.75, batches=(x, y), structure="block16x16", scope="layerwise")
    st.apply_mask_(model, mask)
    sparse = SparseBlockConv2d.from_dense(conv)
    assert sparse.block == (16, 16)
    with torch.no_grad():
        assert rel_err(sparse(x), conv(x)) <= 1e-5
        assert rel_err(sparse(x[0]), conv(x[0])) <= 1e-5
    grouped = nn.Conv2d(16, 32, 3, stride=2, groups=2, bias=False)  # block-diagonal (32, 144) matrix
    sparse = SparseBlockConv2d.from_dense(grouped)
    assert sparse.block == (16, 16)
    with torch.no_grad():
        assert rel_err(sparse(x), grouped(x)) <= 1e-5


def test_block_modules_refuse_gradients():
    sparse = SparseBlockLinear(BlockMatrix.from_dense(torch.ones(8, 8), (8, 8)))
    with pytest.raises(SparsetrainError, match="no_grad"):
        sparse(torch.randn(2, 8, requires_grad=True))


# ----------------------------------------------------------------------------- conversion


def test_forced_bsr_converts_and_equals_dense_masked():
    model, mask, x = block_snip()
    sparse = to_sparse(model, mask, layouts=("bsr",))
    assert isinstance(sparse[0], SparseBlockLinear)
    assert sparse[0].sparse_choice["layout"] == "bsr" and sparse[0].sparse_choice["block"] == [32, 32]
    w = model[0].weight.detach() * mask["0.weight"]
    with torch.no_grad():
        assert rel_err(sparse(x), F.linear(x, w, model[0].bias)) <= 1e-5
    # ("bsr", "csr") without timing: BSR where blocky, CSR elsewhere
    mixed = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 64))
    g = torch.Generator().manual_seed(0)
    mixed_mask = {"0.weight": tile_mask((256, 512), 32, 0.1), "2.weight": torch.rand(64, 256, generator=g) < 0.1}
    converted = to_sparse(mixed, mixed_mask, layouts=("bsr", "csr"))
    assert [r.layout for r in sparse_report(converted)] == ["bsr", "csr"]
    with torch.no_grad():
        assert rel_err(converted(x), st.apply_mask_(copy.deepcopy(mixed), mixed_mask)(x)) <= 1e-5


def test_forcing_bsr_on_a_layer_that_is_not_blocky_is_an_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256))
    mask = {"0.weight": torch.rand(256, 512) < 0.1}  # unstructured
    with pytest.raises(SparsetrainError, match=r"none of the requested layouts.*bsr: its zeros are not blocky.*block32x32"):
        to_sparse(model, mask, layouts=("bsr",))
    with pytest.raises(SparsetrainError, match="not divisible into square tiles"):
        to_sparse(nn.Sequential(nn.Linear(60, 100)), {"0.weight": torch.rand(100, 60) < 0.1}, layouts=("bsr",))
    with pytest.raises(SparsetrainError, match="cannot run block-sparse"):
        SparseBlockLinear.from_dense(st.apply_mask_(model, mask)[0])
    # with another layout beside it, such a layer simply has no bsr candidate
    assert isinstance(to_sparse(model, mask, layouts=("bsr", "csr"))[0], convert_module.SparseLinear)


@pytest.mark.parametrize("structure", ["block32x32", ""])
def test_auto_choice_is_never_slower_than_dense_and_offers_bsr_only_where_blocky(structure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128)).eval()
    x, y = torch.randn(32, 512), torch.randint(0, 128, (32,))
    mask = st.prune_at_init(model, "snip", sparsity=0.9, batches=(x, y), structure=structure, scope="layerwise")
    clear_choice_cache()
    sparse = to_sparse(model, mask, batch_size=32, input_shape=(512,), repeats=3)
    for name in ("0", "2"):
        choice = sparse.get_submodule(name).sparse_choice
        times, estimates = choice["times"], choice["estimates"]
        considered = set(times) | set(estimates)
        assert ("bsr" in considered) == bool(structure)  # a candidate only for the blocky masks
        assert "semi" not in considered  # never on CPU
        picked = choice["candidate"]
        if choice["decided_by"] == "timing":
            assert times[picked] <= times["dense"]
            if picked != "dense":
                assert times[picked] == min(times.values())
                assert times[picked] <= (1 - convert_module.SPARSE_MARGIN) * times["dense"]
        elif choice["decided_by"] == "cost model" and picked != "dense":
            assert estimates[picked] == min(estimates.values())
    with torch.no_grad():
        assert rel_err(sparse(x), st.apply_mask_(copy.deepcopy(model), mask)(x)) <= 1e-5


def test_layers_after_a_bsr_linear_are_timed_on_its_transposed_output(monkeypatch):
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128))
    mask = {"0.weight": tile_mask((256, 512), 32, 0.1), "2.weight": tile_mask((128, 256), 32, 0.1)}
    seen = []

    def fake_choose(layer, in_shape, candidates, repeats, transposed=False, block=None, timer=None):
        seen.append(transposed)
        return "bsr", {}

    monkeypatch.setattr(convert_module, "_choose", fake_choose)
    monkeypatch.setattr(convert_module, "PRIOR_BAND", float("inf"))  # every layer timed
    clear_choice_cache()
    to_sparse(model, mask, batch_size=8, input_shape=(512,), check=False)
    assert seen == [False, True]


# ----------------------------------------------------------------------------- files and report


def test_bsr_save_load_round_trip(tmp_path):
    def factory():
        return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 64, 64), nn.ReLU(),
                             nn.Linear(64, 10)).eval()

    torch.manual_seed(0)
    model = factory()
    x, y = torch.randn(4, 16, 8, 8), torch.randint(0, 10, (4,))
    mask = st.prune_at_init(model, "snip", sparsity=0.8, batches=(x, y), structure="block16x16", scope="layerwise")
    del mask["4.weight"]  # 10 x 64: no 16x16 tiles; stays dense
    sparse = to_sparse(model, mask, layouts=("bsr",))
    path = tmp_path / "bsr.safetensors"
    save_sparse(sparse, path)
    tensors, meta = load_tensors(path)
    assert '"sparsetrain.sparse/2"' in meta["sparsetrain.sparse"]
    assert tensors["2.crow_indices"].dtype == torch.int32 and tensors["2.values"].dim() == 3
    assert "2.weight" not in tensors and "0.weight" not in tensors
    for source in (factory, factory()):
        loaded = load_sparse(path, source)
        assert isinstance(loaded[0], SparseBlockConv2d) and isinstance(loaded[2], SparseBlockLinear)
        assert [(r.name, r.layout, r.block, r.nnz, r.stored_bytes) for r in sparse_report(loaded)] == [
            (r.name, r.layout, r.block, r.nnz, r.stored_bytes) for r in sparse_report(sparse)
        ]
        with torch.no_grad():
            assert torch.equal(loaded(x), sparse(x))
    # a damaged file (a tile column out of range) is refused, not read out of bounds
    tensors["2.col_indices"] = tensors["2.col_indices"].clone()
    tensors["2.col_indices"][0] = 10_000
    save_tensors(path, tensors, meta)
    with pytest.raises(SparsetrainError, match="corrupt BSR"):
        load_sparse(path, factory)


def test_bsr_report_bytes_follow_the_formula():
    model, mask, _ = block_snip()
    rows = sparse_report(to_sparse(model, mask, layouts=("bsr",)))
    (r,) = rows
    M, K = r.shape
    nblocks = int(mask["0.weight"].sum()) // (32 * 32)
    assert r.layout == "bsr" and r.block == (32, 32) and r.choice == "bsr"
    assert r.stored_bytes == 4 * (M // 32 + 1) + 4 * nblocks + 4 * nblocks * 32 * 32 + 4 * M
    assert r.params == nblocks * 32 * 32 + M and r.nnz == int(mask["0.weight"].sum())
    assert "bsr:32x32" in format_sparse_report(rows)


# ----------------------------------------------------------------------------- 2:4 (CPU parts)


def two_four_weight(shape=(64, 128), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w = w * nm_mask(torch.rand(shape, generator=g), 2, 4)
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 3.0])  # a group with one nonzero
    w[1, :4] = 0.0  # and one with none
    return w


def test_2to4_compression_round_trip():
    w = two_four_weight()
    assert is_2to4(w) and not is_2to4(torch.ones(4, 8))
    values, meta = compress_2to4(w)
    assert values.shape == (64, 64) and meta.shape == (64, 16) and meta.dtype == torch.uint8
    assert torch.equal(decompress_2to4(values, meta, (64, 128)), w)
    with pytest.raises(SparsetrainError, match="not 2:4"):
        compress_2to4(torch.ones(4, 8))


def test_semi_is_never_a_candidate_on_cpu():
    w = two_four_weight()
    assert "CUDA" in semi_structured_problem(w)
    assert "semi" not in convert_module._check_layouts(None)
    model = nn.Sequential(nn.Linear(128, 64))
    with torch.no_grad():
        model[0].weight.copy_(w)
    with pytest.raises(SparsetrainError, match="only on CUDA"):
        to_sparse(model, None, layouts=("semi",))
    with pytest.raises(SparsetrainError, match="only on CUDA"):
        to_sparse(model, None, layouts=("dense", "semi"), batch_size=2, input_shape=(128,))


def test_semi_module_builds_saves_and_loads_off_cuda_but_refuses_to_run(tmp_path):
    layer = nn.Linear(128, 64)
    with torch.no_grad():
        layer.weight.copy_(two_four_weight())
    semi = SparseSemiStructuredLinear.from_dense(layer)
    assert torch.equal(semi.to_dense_weight(), layer.weight.detach())
    assert semi.stored_bytes() == 64 * 64 * 4 + 64 * 16 + 64 * 4
    with torch.no_grad(), pytest.raises(SparsetrainError, match="CUDA"):
        semi(torch.randn(2, 128))
    model = nn.Sequential(semi)
    path = tmp_path / "semi.safetensors"
    save_sparse(model, path)
    loaded = load_sparse(path, lambda: nn.Sequential(nn.Linear(128, 64)))
    assert isinstance(loaded[0], SparseSemiStructuredLinear)
    assert torch.equal(loaded[0].to_dense_weight(), layer.weight.detach())
    (row,) = sparse_report(loaded)
    assert row.layout == "semi" and row.nnz == int((layer.weight != 0).sum()) and row.params == 64 * 64 + 64


def test_semi_plumbing_with_a_stand_in_backend(monkeypatch):
    """The module's own logic (runtime check, backend tensor built once per set of buffers, input
    reshaping, bias) with torch's 2:4 conversion replaced by the identity; the kernels themselves
    are checked by the CUDA tests."""
    from sparsetrain.sparse import block

    built = []
    monkeypatch.setattr(block, "_semi_runtime_problem", lambda device, dtype, shape: None)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: built.append(w) or w)
    layer = nn.Linear(128, 64)
    with torch.no_grad():
        layer.weight.copy_(two_four_weight())
    semi = SparseSemiStructuredLinear.from_dense(layer)
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        assert rel_err(semi(x), layer(x)) <= 1e-6
        assert rel_err(semi(x[0].t().contiguous().t()), layer(x[0])) <= 1e-6
        assert len(built) == 1  # built once
        semi.double()  # new buffers: built again, in float64
        assert rel_err(semi(x.double()), layer.double()(x.double())) <= 1e-12 and len(built) == 2
    monkeypatch.setattr(convert_module, "semi_structured_problem", lambda w: None)
    assert convert_module._layer_candidates("0", layer, ("semi",)) == (("semi",), None)
    with pytest.raises(SparsetrainError, match="only Linear layers run as 2:4"):
        convert_module._layer_candidates("c", nn.Conv2d(4, 8, 3), ("semi",))


# ----------------------------------------------------------------------------- CUDA


@CUDA
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # a candidate that fails is dropped with a warning
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_equals_dense_masked_on_cuda(dtype):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need compute capability 8.0+")
    model, mask, _ = block_snip(structure="2:4", sparsity=None)
    layer = st.apply_mask_(copy.deepcopy(model), mask)[0].to("cuda", dtype)
    assert semi_structured_problem(layer.weight) is None
    semi = SparseSemiStructuredLinear.from_dense(layer).cuda()
    x = torch.randn(128, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        assert rel_err(semi(x).float(), F.linear(x, layer.weight, layer.bias).float()) <= 2e-2
    clear_choice_cache()
    fast = to_sparse(model.to(dtype), mask, batch_size=128, input_shape=(512,), device="cuda", repeats=3)
    times = fast[0].sparse_choice["times"]
    assert "semi" in times and "csr:kernel" not in times
    with torch.no_grad():
        assert rel_err(fast(x).float(), F.linear(x, layer.weight, layer.bias).float()) <= 2e-2


@CUDA
def test_bsr_on_cuda_equals_dense_masked():
    model, mask, x = block_snip()
    layer = st.apply_mask_(copy.deepcopy(model), mask)[0].cuda()
    sparse = SparseBlockLinear.from_dense(layer)
    x = x.cuda()
    with torch.no_grad():
        assert rel_err(sparse(x), F.linear(x, layer.weight, layer.bias)) <= 1e-4  # TF32 may be on
    fast = to_sparse(model, mask, layouts=("bsr",), device="cuda")
    with torch.no_grad():
        assert rel_err(fast(x), F.linear(x, layer.weight, layer.bias)) <= 1e-4
