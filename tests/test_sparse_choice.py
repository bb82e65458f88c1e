"""to_sparse's layout choice cannot be fooled by load: a fake adversarial timer that makes one side
10x slower in one call of two never turns a clearly sparse layer dense, nor returns a converted
model that is slower than dense. No real time is asserted anywhere (timed tests flake)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsetrain.measure import Timings
from sparsetrain.sparse import SparseLinear, clear_choice_cache, to_sparse
from sparsetrain.sparse import convert as convert_module

CHECK_KEYS = {"dense", "sparse"}  # the end-to-end check times these two; a layer its candidates


class AdversarialTimer:
    """Honest times from ``truth`` (``truth(key, check_call)`` seconds, ``check_call`` counting the
    end-to-end calls from 0, ``None`` for a layer's timing), except that in one call of two
    (``phase``) every ``victim`` candidate ("dense" or "sparse": all non-dense ones) is 10x slower."""

    def __init__(self, truth, victim: str, phase: int):
        self.truth, self.victim, self.phase = truth, victim, phase
        self.calls = self.check_calls = 0
        self.keys: list[set[str]] = []

    def __call__(self, fns, **_):
        lie = self.calls % 2 == self.phase
        self.calls += 1
        check_call = None
        if set(fns) == CHECK_KEYS:
            check_call = self.check_calls
            self.check_calls += 1
        self.keys.append(set(fns))
        samples = {}
        for k in fns:
            t = self.truth(k, check_call)
            if lie and (k == "dense") == (self.victim == "dense"):
                t *= 10
            samples[k] = [t] * 5
        return Timings(samples)


def sparse_mlp(sizes, densities, seed=0):
    """Sequential of Linear layers (sizes[i] -> sizes[i+1]) with ReLUs and a random mask each."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).eval()
    mask = {f"{2 * i}.weight": torch.rand(b, a) < d
            for i, ((a, b), d) in enumerate(zip(zip(sizes[:-1], sizes[1:]), densities))}
    return model, mask


@pytest.mark.parametrize("victim", ["sparse", "dense"])
@pytest.mark.parametrize("phase", [0, 1])
def test_a_clearly_sparse_layer_is_converted_whatever_the_load(victim, phase):
    """4096x4096 at 95%, batch 1: the cost model decides it (no layer timing to fool), and the
    end-to-end check, lied to in one of its two calls, still sees the truth (sparse 5x faster)."""
    model, mask = sparse_mlp([4096, 4096], [0.05])
    timer = AdversarialTimer(lambda k, c: 1.0 if k == "dense" else 0.2, victim, phase)
    clear_choice_cache()
    fast = to_sparse(model, mask, batch_size=1, input_shape=(4096,), timer=timer)
    assert isinstance(fast[0], SparseLinear)
    choice = fast[0].sparse_choice
    assert choice["decided_by"] == "cost model" and choice["times"] == {}
    assert timer.keys == [CHECK_KEYS, CHECK_KEYS]  # only the end-to-end check was timed, twice
    assert choice["end_to_end"]["checks"][-1]["time_ratio_sparse_over_dense"] == pytest.approx(0.2)


@pytest.mark.parametrize("phase", [0, 1])
def test_a_model_slower_end_to_end_is_not_returned(phase):
    """Every layer looks faster sparse in its own timing (near break-even, so timed), but the
    whole converted model is slower than dense (the LeNet-300-100 at 90%, batch 1, 0.91x case);
    the adversary makes dense 10x slower in one of two calls, which one call would believe."""
    model, mask = sparse_mlp([256, 256, 256], [0.2, 0.2])
    truth = {"dense": 1.0, "sparse": 1.1}
    timer = AdversarialTimer(lambda k, c: truth.get(k, 0.5), "dense", phase)
    clear_choice_cache()
    fast = to_sparse(model, mask, batch_size=1, input_shape=(256,), timer=timer)
    for name in ("0", "2"):
        layer = fast.get_submodule(name)
        assert type(layer) is nn.Linear
        assert layer.sparse_choice["decided_by"] == "end-to-end check"
        assert layer.sparse_choice["rejected"].startswith("csr")
    assert timer.check_calls == 2  # all layers were timed: no partial fallback to try


@pytest.mark.parametrize("phase", [0, 1])
def test_fallback_puts_back_the_timed_layers_first(phase):
    """A clearly sparse layer (cost model) and a near-break-even one (timed, and fooled): when the
    whole model is slower, the timed layer goes back to dense and the check is repeated; here that
    is faster than dense, so the clearly sparse layer stays sparse."""
    model, mask = sparse_mlp([2048, 256, 256], [0.05, 0.2])

    def truth(key, check_call):
        if check_call is None:
            return 1.0 if key == "dense" else 0.5  # the second layer looks faster sparse alone
        return {"dense": 1.0, "sparse": 1.1 if check_call < 2 else 0.6}[key]

    timer = AdversarialTimer(truth, "dense", phase)
    clear_choice_cache()
    fast = to_sparse(model, mask, batch_size=1, input_shape=(2048,), timer=timer)
    assert isinstance(fast[0], SparseLinear) and fast[0].sparse_choice["decided_by"] == "cost model"
    assert type(fast[2]) is nn.Linear and fast[2].sparse_choice["decided_by"] == "end-to-end check"
    record = fast[0].sparse_choice["end_to_end"]
    assert record["reverted"] == ["2"]
    assert [c["time_ratio_sparse_over_dense"] for c in record["checks"]] == pytest.approx([1.1, 0.6])
    with torch.no_grad():  # and it computes what the dense masked model computes
        x = torch.randn(1, 2048)
        dense = nn.Sequential(*[m for m in model]).eval()
        for n, m in mask.items():
            dense.get_submodule(n.split(".")[0]).weight.data.mul_(m)
        torch.testing.assert_close(fast(x), dense(x), rtol=1e-4, atol=1e-5)


def test_a_clearly_dense_layer_is_not_timed_and_no_check_runs():
    """Large batch, 50% sparse: dense without timing (and with nothing converted, nothing to check)."""
    model, mask = sparse_mlp([512, 512], [0.45])
    calls = []
    timer = AdversarialTimer(lambda k, c: calls.append(k) or 1.0, "sparse", 0)
    clear_choice_cache()
    fast = to_sparse(model, mask, batch_size=256, input_shape=(512,), timer=timer)
    assert type(fast[0]) is nn.Linear and fast[0].sparse_choice["decided_by"] == "cost model"
    assert calls == []


def test_second_conversion_neither_times_nor_checks():
    model, mask = sparse_mlp([2048, 256, 256], [0.05, 0.2])
    timer = AdversarialTimer(lambda k, c: 1.0 if k == "dense" else 0.5, "sparse", 1)
    clear_choice_cache()
    first = to_sparse(model, mask, batch_size=1, input_shape=(2048,), timer=timer)
    calls = timer.calls
    assert calls > 0
    second = to_sparse(model, mask, batch_size=1, input_shape=(2048,), timer=timer)
    assert timer.calls == calls
    assert [type(m) for m in first] == [type(m) for m in second]


def test_check_false_skips_the_end_to_end_timing():
    model, mask = sparse_mlp([2048, 256], [0.05])
    timer = AdversarialTimer(lambda k, c: 1.0, "sparse", 0)
    clear_choice_cache()
    fast = to_sparse(model, mask, batch_size=1, input_shape=(2048,), timer=timer, check=False)
    assert isinstance(fast[0], SparseLinear) and timer.calls == 0 and "end_to_end" not in fast[0].sparse_choice


def test_estimates_follow_the_work():
    """The cost model: more nonzeros cost the sparse layouts more; a bigger batch favours dense."""
    torch.manual_seed(0)
    layer = nn.Linear(512, 512)
    est = convert_module.estimate_times
    with torch.no_grad():
        layer.weight.mul_(torch.rand(512, 512) < 0.05)
    sparse_small = est(layer, (1, 512), ("dense", "csr:kernel", "csr:torch"))
    assert sparse_small["csr:kernel"] < sparse_small["csr:torch"]
    with torch.no_grad():
        layer.weight.copy_(torch.randn(512, 512) * (torch.rand(512, 512) < 0.3))
    sparse_more = est(layer, (1, 512), ("dense", "csr:kernel"))
    assert sparse_more["csr:kernel"] > sparse_small["csr:kernel"]
    assert sparse_more["dense"] == pytest.approx(sparse_small["dense"])
    big = est(layer, (4096, 512), ("dense", "csr:kernel"))
    assert big["csr:kernel"] / big["dense"] > sparse_more["csr:kernel"] / sparse_more["dense"]
    conv = nn.Conv2d(16, 32, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.1)
    c = est(conv, (8, 16, 12, 12), ("dense", "csr:kernel", "bsr"), block=(4, 4))
    assert all(v > 0 for v in c.values())


@pytest.mark.parametrize("ratio, converted", [(0.98, False), (0.90, True)])
def test_a_tie_end_to_end_is_not_worth_converting(ratio, converted):
    """A model that every layer decision favours, but that is only within noise of dense end to end
    (ratio 0.98), comes back dense; one clearly faster (0.90) comes back sparse."""
    model, mask = sparse_mlp([1024, 1024], [0.05])  # clearly sparse by the cost model: no layer timing
    clear_choice_cache()
    def honest(fns, **_):  # the end-to-end check's two keys; no layer is timed here
        return Timings({k: [ratio if k == "sparse" else 1.0] * 5 for k in fns})

    result = to_sparse(model, mask, batch_size=1, input_shape=(1024,), timer=honest)
    assert isinstance(result[0], SparseLinear) == converted
    if not converted:
        assert result[0].sparse_choice["decided_by"] == "end-to-end check"
