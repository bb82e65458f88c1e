"""Sparse execution equals the dense masked model; kernels against F.linear; files; report."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsetrain as st
from sparsetrain.errors import SparsetrainError
from sparsetrain.measure import Timings
from sparsetrain.sparse import (
    CSRMatrix,
    SparseConv2d,
    SparseLinear,
    clear_choice_cache,
    csr_linear,
    csr_matmul,
    extension_available,
    format_sparse_report,
    load_sparse,
    save_sparse,
    sparse_report,
    to_sparse,
)
from sparsetrain.sparse import convert as convert_module

INPUT = (1, 16, 16)
BACKENDS = ["torch", pytest.param("kernel", marks=pytest.mark.skipif(not extension_available(), reason="no C++ kernel"))]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def input_of(name: str) -> tuple[int, ...]:
    """INPUT for image models, its 16 rows of 16 pixels for sequence models."""
    from sparsetrain.models import default_input_shape

    return INPUT if len(default_input_shape(name)) == 3 else INPUT[1:]


def models_with_layers() -> list[str]:
    names = []
    for name in st.list_models():
        model = st.create_model(name, input_shape=input_of(name))
        if any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules()):
            names.append(name)
    return names


def pruned(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = st.create_model(name, input_shape=input_of(name)).eval()
    x, y = torch.randn(8, *input_of(name)), torch.randint(0, 10, (8,))
    mask = st.prune_at_init(model, "snip", sparsity=0.9, batches=(x, y))
    return model, mask, x


def random_sparse(shape, density, empty_rows=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)
    for r in empty_rows:
        w[r] = 0
    return w


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("shape,density", [((7, 5), 0.5), ((37, 100), 0.1), ((128, 65), 0.03), ((20, 300), 0.0)])
def test_csr_linear_equals_f_linear(backend, batch, shape, density):
    w = random_sparse(shape, density, empty_rows=(0, shape[0] // 2), seed=batch)
    x, b = torch.randn(batch, shape[1]), torch.randn(shape[0])
    W = CSRMatrix.from_dense(w)
    assert W.crow_indices.dtype == W.col_indices.dtype == torch.int32
    assert torch.equal(W.to_dense(), w)
    for bias in (b, None):
        ref = F.linear(x, w, bias)
        out = csr_linear(x, W, bias, backend=backend)
        assert out.shape == ref.shape
        assert rel_err(out, ref) <= 1e-5 if ref.norm() > 0 else torch.equal(out, ref)
    # a transposed (non-contiguous) input and a 3-D input give the same result
    assert rel_err(csr_linear(x.t().contiguous().t(), W, b, backend=backend), F.linear(x, w, b)) <= 1e-5
    x3 = torch.randn(2, batch, shape[1])
    assert rel_err(csr_linear(x3, W, b, backend=backend), F.linear(x3, w, b)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n", [19, 150])  # 150 = 2 x 64 + 16 + 4 + 2: every column-block width
def test_csr_matmul_batched(backend, dtype, tol, n):
    w = random_sparse((33, 70), 0.2, empty_rows=(3,)).to(dtype)
    X, b = torch.randn(4, 70, n, dtype=dtype), torch.randn(33, dtype=dtype)
    out = csr_matmul(CSRMatrix.from_dense(w), X, b, backend=backend)
    assert out.dtype == dtype
    assert rel_err(out, w @ X + b[:, None]) <= tol


KERNEL_ONLY = pytest.mark.skipif(not extension_available(), reason="no C++ kernel")


@KERNEL_ONLY
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [2, 16, 17, 40, 64, 130])  # 64, 130: blocks of 64 (+ a remainder)
@pytest.mark.parametrize("in_features", [83, 96])  # with and without a tail after the 16x16 tiles
def test_fused_row_major_path_equals_transposed_path(monkeypatch, threads, dtype, batch, in_features):
    """A row-major input goes through the fused transpose (csr_linear_rows), a transposed view
    through csr_matmul: both equal F.linear, full and partial blocks of 16 (and of 64, float with
    AVX-512), on 1 and 2 threads."""
    from sparsetrain.sparse import kernels

    monkeypatch.setattr(kernels, "MIN_PARALLEL_WORK", 0)  # let 2 threads split even small calls
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = random_sparse((45, in_features), 0.1, empty_rows=(0, 44), seed=batch).to(dtype)
        W, b = CSRMatrix.from_dense(w), torch.randn(45, dtype=dtype)
        x = torch.randn(batch, in_features, dtype=dtype)
        ref = F.linear(x, w, b)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        rows = csr_linear(x, W, b, backend="kernel")
        via_t = csr_linear(x.t().contiguous().t(), W, b, backend="kernel")
        assert rows.stride() == via_t.stride() == (1, batch)
        assert rel_err(rows, ref) <= tol and rel_err(via_t, ref) <= tol
        assert rel_err(csr_linear(x, W, None, backend="kernel"), F.linear(x, w)) <= tol
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_csr_linear_returns_fresh_tensors_and_converts_bias(backend):
    w = random_sparse((30, 50), 0.2)
    W = CSRMatrix.from_dense(w)
    x1, x2 = torch.randn(20, 50), torch.randn(20, 50)
    y1 = csr_linear(x1, W, backend=backend)
    kept = y1.clone()
    y2 = csr_linear(x2, W, backend=backend)
    assert torch.equal(y1, kept) and y1.data_ptr() != y2.data_ptr()  # no output buffer reused
    b = torch.randn(60, dtype=torch.float64)[::2]  # another dtype, not contiguous: converted
    assert rel_err(csr_linear(x1, W, b, backend=backend), F.linear(x1, w, b.float())) <= 1e-5


def test_csr_validate_rejects_out_of_range_indices():
    W = CSRMatrix.from_dense(random_sparse((4, 6), 0.5))
    bad = CSRMatrix(W.crow_indices, torch.full_like(W.col_indices, 6), W.values, W.shape)
    with pytest.raises(SparsetrainError, match="corrupt CSR"):
        bad.validate()
    with pytest.raises(SparsetrainError, match="int32"):
        CSRMatrix(W.crow_indices.long(), W.col_indices, W.values, W.shape)


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("name", models_with_layers())
def test_forced_sparse_equals_dense_masked(name):
    model, mask, x = pruned(name)
    for backend in ["torch"] + (["kernel"] if extension_available() else []):
        sparse = to_sparse(model, mask, layouts=("csr",))
        for m in sparse.modules():  # pin the backend so both are exercised
            if isinstance(m, (SparseLinear, SparseConv2d)):
                m.backend = backend
        dense = _masked_copy(model, mask)
        converted = [m for m in sparse.modules() if isinstance(m, (SparseLinear, SparseConv2d))]
        expected = [n for n in mask if n.endswith("weight") and "encoder" not in n and type(
            dense.get_submodule(n.rpartition(".")[0])) in (nn.Linear, nn.Conv2d)]
        assert len(converted) == len(expected) > 0
        with torch.no_grad():
            assert rel_err(sparse(x), dense(x)) <= 1e-5


def _masked_copy(model, mask):
    import copy

    return st.apply_mask_(copy.deepcopy(model), mask)


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5-caffe", "resnet-tiny"])
def test_auto_choice_is_consistent_with_its_own_evidence(name):
    """Each layer's record says how it was decided, and the decision follows from that evidence
    (no limit on any time: the times are whatever this machine measured)."""
    model, mask, x = pruned(name)
    clear_choice_cache()
    sparse = to_sparse(model, mask, batch_size=8, input_shape=INPUT, repeats=3)
    layer_names = _layer_names(mask)
    records = {n: m.sparse_choice for n, m in sparse.named_modules() if getattr(m, "sparse_choice", None)}
    assert layer_names <= set(records) | {n for n in layer_names if n.startswith("encoder")}
    for choice in records.values():
        how, picked = choice["decided_by"], choice["candidate"]
        assert how in ("cost model", "timing", "end-to-end check")
        if how == "timing":
            times = choice["times"]
            assert times[picked] <= times["dense"]
            if picked != "dense":  # sparse is taken only when it clearly wins
                assert times[picked] == min(times.values())
                assert times[picked] <= (1 - convert_module.SPARSE_MARGIN) * times["dense"]
        elif how == "cost model" and choice["estimates"]:
            est = choice["estimates"]
            best = min((c for c in est if c != "dense"), key=est.get)
            ratio = est[best] / est["dense"]
            assert (picked == best and ratio * convert_module.PRIOR_BAND <= 1) or (
                picked == "dense" and ratio >= convert_module.PRIOR_BAND)
        elif how == "end-to-end check":
            assert picked == "dense" and choice["rejected"] != "dense"
    converted = [c for c in records.values() if c["candidate"] != "dense"]
    for c in converted:  # the accepted end-to-end check found the converted model no slower
        assert c["end_to_end"]["checks"][-1]["time_ratio_sparse_over_dense"] <= 1.0
    with torch.no_grad():
        assert rel_err(sparse(x), _masked_copy(model, mask)(x)) <= 1e-5


def _layer_names(mask):
    return {n.rpartition(".")[0] for n in mask}


def test_second_conversion_does_not_retime(monkeypatch):
    model, mask, _ = pruned("lenet-300-100")
    clear_choice_cache()
    first = to_sparse(model, mask, batch_size=4, input_shape=INPUT, repeats=3)
    calls = []
    monkeypatch.setattr(convert_module, "_choose", lambda *a, **k: calls.append(a) or ("dense", {}))
    second = to_sparse(model, mask, batch_size=4, input_shape=INPUT, repeats=3)
    assert calls == []
    assert [r.layout for r in sparse_report(first)] == [r.layout for r in sparse_report(second)]
    to_sparse(model, mask, batch_size=5, input_shape=INPUT, repeats=3)  # another batch size: timed anew
    assert calls


def test_layers_are_timed_on_the_layout_they_receive(monkeypatch):
    """A sparse Linear returns a transposed view, which the next Linear receives through ReLU:
    to_sparse times that layer on a transposed input, and on a contiguous one after a dense layer
    (here: the first layer as given, the others sparse)."""
    model, mask, x = pruned("lenet-300-100")
    monkeypatch.setattr(convert_module, "PRIOR_BAND", float("inf"))  # every layer timed, none by the cost model
    monkeypatch.setattr(convert_module, "MAX_SPARSE_DENSITY", 1.0)  # (the 10-output layer is mostly dense)
    csr = "csr:kernel" if extension_available() else "csr:torch"
    for first, expected in ((csr, [False, True, True]), ("dense", [False, False, True])):
        clear_choice_cache()
        seen = []

        def fake_choose(layer, in_shape, candidates, repeats, transposed=False, block=None, timer=None):
            seen.append(transposed)
            return (first if not seen[:-1] else csr), {}

        monkeypatch.setattr(convert_module, "_choose", fake_choose)
        sparse = to_sparse(model, mask, batch_size=8, input_shape=INPUT, check=False)
        assert seen == expected
        assert [sparse.get_submodule(n).sparse_choice["input_transposed"] for n in ("1", "3", "5")] == expected
        with torch.no_grad():
            assert rel_err(sparse(x), _masked_copy(model, mask)(x)) <= 1e-5
    monkeypatch.undo()
    layer = st.apply_mask_(model, mask).get_submodule("3")
    choice, times = convert_module._choose(layer, (8, 300), ("dense", csr), 3, True)
    assert choice in times and set(times) == {"dense", csr}


def test_mask_none_uses_zeros_in_weights_and_original_is_untouched():
    model, mask, x = pruned("lenet-5-caffe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = _masked_copy(model, mask)
    sparse = to_sparse(dense, None, layouts=("csr",))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert sum(isinstance(m, (SparseLinear, SparseConv2d)) for m in sparse.modules()) == 4
    with torch.no_grad():
        assert rel_err(sparse(x), dense(x)) <= 1e-5


def test_grouped_strided_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 9, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=3)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.4)
    x = torch.randn(2, 6, 11, 10)
    for backend in ["torch"] + (["kernel"] if extension_available() else []):
        sparse = SparseConv2d.from_dense(conv, backend)
        with torch.no_grad():
            assert rel_err(sparse(x), conv(x)) <= 1e-5
            assert rel_err(sparse(x[0]), conv(x[0])) <= 1e-5


def test_sparse_modules_refuse_gradients():
    sparse = SparseLinear.from_dense(nn.Linear(4, 3))
    with pytest.raises(SparsetrainError, match="no_grad"):
        sparse(torch.randn(2, 4, requires_grad=True))


# ----------------------------------------------------------------------------- files and report


def test_save_load_round_trip(tmp_path):
    model, mask, x = pruned("lenet-5-caffe")
    sparse = to_sparse(model, mask, batch_size=2, input_shape=INPUT, repeats=3)
    sparse.get_submodule("0").sparse_choice  # every candidate carries its choice
    path = tmp_path / "sparse.safetensors"
    save_sparse(sparse, path)
    factory = lambda: st.create_model("lenet-5-caffe", input_shape=INPUT).eval()  # noqa: E731
    for source in (factory, factory()):
        loaded = load_sparse(path, source)
        assert [(r.name, r.layout, r.nnz, r.stored_bytes, r.dense_time) for r in sparse_report(loaded)] == [
            (r.name, r.layout, r.nnz, r.stored_bytes, r.dense_time) for r in sparse_report(sparse)
        ]
        with torch.no_grad():
            assert torch.equal(loaded(x), sparse(x))
    forced = to_sparse(model, mask, layouts=("csr",))
    save_sparse(forced, path)
    from sparsetrain.state_io import load_tensors

    tensors, _ = load_tensors(path)
    assert tensors["0.crow_indices"].dtype == torch.int32 and "0.weight" not in tensors
    with torch.no_grad():
        assert torch.equal(load_sparse(path, factory)(x), forced(x))
    with pytest.raises(SparsetrainError):
        load_sparse(path, lambda: st.create_model("lenet-300-100", input_shape=INPUT))


def test_report_byte_counts_follow_the_formula():
    model, mask, _ = pruned("lenet-300-100")
    sparse = to_sparse(model, mask, layouts=("csr",))
    rows = sparse_report(sparse)
    assert [r.name for r in rows] == ["1", "3", "5"]
    for r in rows:
        M, K = r.shape
        nnz = int(mask[f"{r.name}.weight"].sum())
        assert r.nnz == nnz and r.layout == "csr"
        assert r.dense_bytes == 4 * (M * K + M)
        assert r.stored_bytes == 4 * (M + 1) + 8 * nnz + 4 * M
        assert r.params == nnz + M and r.dense_params == M * K + M
    assert rows.total.stored_bytes == sum(r.stored_bytes for r in rows)
    text = format_sparse_report(rows)
    assert "total" in text and "csr" in text
    dense_rows = sparse_report(to_sparse(model, mask, layouts=("dense",)))
    assert all(r.layout == "dense" and r.stored_bytes == r.dense_bytes for r in dense_rows)


def test_large_layer_stores_about_ten_percent():
    w = random_sparse((512, 512), 0.05)
    W = CSRMatrix.from_dense(w)
    assert W.nbytes == 4 * 513 + 8 * W.nnz
    assert W.nbytes <= 0.12 * w.numel() * 4


# ----------------------------------------------------------------------------- bad input


def test_mask_that_does_not_fit_is_rejected():
    model = st.create_model("lenet-300-100", input_shape=INPUT)
    with pytest.raises(SparsetrainError, match="does not fit"):
        to_sparse(model, {"1.weight": torch.ones(3, 3, dtype=torch.bool)}, layouts=("csr",))
    with pytest.raises(SparsetrainError, match="not a parameter"):
        to_sparse(model, {"nope.weight": torch.ones(3, 3, dtype=torch.bool)}, layouts=("csr",))


def test_bad_options_are_rejected():
    model, mask, _ = pruned("mlp-tiny")
    with pytest.raises(SparsetrainError, match="layouts"):
        to_sparse(model, mask, layouts=("coo",))
    with pytest.raises(SparsetrainError, match="input_shape"):
        to_sparse(model, mask)
    with pytest.raises(SparsetrainError, match="does not fit"):
        to_sparse(model, mask, input_shape=(3, 5, 5))
    with pytest.raises(SparsetrainError, match="batch_size"):
        to_sparse(model, mask, batch_size=0, input_shape=INPUT)
    with pytest.raises(SparsetrainError, match="features"):
        csr_linear(torch.randn(2, 5), CSRMatrix.from_dense(torch.eye(4)))


def test_a_bare_layer_is_converted_itself():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    mask = {"weight": torch.rand(32, 64) < 0.1}
    converted = to_sparse(layer, mask, layouts=("csr",))
    assert isinstance(converted, SparseLinear)
    x = torch.randn(5, 64)
    torch.testing.assert_close(converted(x), F.linear(x, layer.weight * mask["weight"], layer.bias))


def test_a_mostly_dense_layer_stays_dense_even_if_timed_faster(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    mask = {"0.weight": torch.rand(64, 64) < 0.9}  # 10% sparse: CSR would double the bytes
    convert_module.clear_choice_cache()
    converted = to_sparse(model, mask, batch_size=4, input_shape=(64,), timer=fixed_timer(dense=1.0, sparse=0.5))
    assert isinstance(converted[0], nn.Linear)
    # and a sparse layer that is only marginally faster than dense is not taken either
    mask = {"0.weight": torch.rand(64, 64) < 0.05}
    convert_module.clear_choice_cache()
    converted = to_sparse(model, mask, batch_size=4, input_shape=(64,), timer=fixed_timer(dense=1.0, sparse=0.95))
    assert isinstance(converted[0], nn.Linear)
    assert converted[0].sparse_choice["decided_by"] == "timing"  # near break-even: timed, not modelled


def fixed_timer(dense: float, sparse: float):
    """A fake timer: every sparse candidate takes ``sparse`` seconds, dense ``dense``."""
    def timer(fns, **_):
        return Timings({k: [dense if k == "dense" else sparse] * 3 for k in fns})
    return timer
