"""Masks: files, fit to a model, summaries."""

import pytest
import torch

from sparsetrain import SparsetrainError, apply_mask_, create_model, load_mask, prune_at_init, save_mask
from sparsetrain.masks import format_sparsity_table, mask_summary, overall_sparsity


def snip_mask(model_name="lenet-5-caffe", sparsity=0.98):
    torch.manual_seed(0)
    model = create_model(model_name)
    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))
    return model, prune_at_init(model, "snip", sparsity=sparsity, batches=(x, y), include_biases=True)


def test_save_load_round_trip(tmp_path):
    model, mask = snip_mask()
    save_mask(tmp_path / "m.safetensors", mask, {"model": "lenet-5-caffe"})
    loaded = load_mask(tmp_path / "m.safetensors", model)
    assert list(loaded) == list(mask)
    assert all(loaded[n].dtype == torch.bool and torch.equal(loaded[n], mask[n]) for n in mask)


def test_a_mask_for_another_model_is_refused(tmp_path):
    _, mask = snip_mask("lenet-5-caffe")
    save_mask(tmp_path / "m.safetensors", mask)
    with pytest.raises(SparsetrainError, match="does not fit the model.*not a parameter"):
        load_mask(tmp_path / "m.safetensors", create_model("lenet-300-100"))
    wrong_shape = {"1.weight": torch.ones(300, 100, dtype=torch.bool)}
    with pytest.raises(SparsetrainError, match=r"shape \(300, 100\), the parameter \(300, 784\)"):
        apply_mask_(create_model("lenet-300-100"), wrong_shape)


def test_a_corrupt_mask_file_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(SparsetrainError, match=str(path.name)):
        load_mask(path)


def test_apply_and_summaries():
    model, mask = snip_mask(sparsity=0.9)
    apply_mask_(model, mask)
    params = dict(model.named_parameters())
    for n, m in mask.items():
        assert int(torch.count_nonzero(params[n])) <= int(m.sum())
    total = sum(m.numel() for m in mask.values())
    assert overall_sparsity(mask) == pytest.approx(1 - round(total * 0.1) / total)
    rows = mask_summary(mask)
    assert [r.name for r in rows] == list(mask)
    assert sum(r.kept for r in rows) == round(total * 0.1)
    table = format_sparsity_table(mask)
    assert "0.weight" in table and "all" in table and "90.00%" in table


def test_a_mask_records_what_it_left_out_and_keeps_it_in_files(tmp_path):
    from sparsetrain.masks import Mask

    model, mask = snip_mask("conv-tiny", sparsity=0.5)  # batch-norm: left out
    assert isinstance(mask, Mask) and isinstance(mask, dict)
    assert mask.left_out == {"1.weight": "normalisation layer", "1.bias": "normalisation layer"}
    mask.notes["0.weight"] = "a note"
    table = format_sparsity_table(mask)
    assert "left dense (not pruned):\n  1.weight: normalisation layer" in table and "  0.weight: a note" in table
    save_mask(tmp_path / "m.safetensors", mask)
    loaded = load_mask(tmp_path / "m.safetensors", model)
    assert loaded.left_out == mask.left_out and loaded.notes == mask.notes and list(loaded) == list(mask)
    import copy
    import pickle

    for twin in (copy.deepcopy(mask), pickle.loads(pickle.dumps(mask))):
        assert twin.left_out == mask.left_out and twin.notes == mask.notes and list(twin) == list(mask)
    plain = {n: m for n, m in mask.items()}  # a plain dict is accepted everywhere
    assert "left dense" not in format_sparsity_table(plain)
    save_mask(tmp_path / "p.safetensors", plain)
    assert load_mask(tmp_path / "p.safetensors").left_out == {}
    apply_mask_(model, plain)
