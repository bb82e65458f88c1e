"""Mask files say what they are (method, real sparsity, model, source, version, checksum), damaged
files and masks for another model are refused with what to do, and a mask holds booleans or 0/1."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import safetensors
import torch
from safetensors.torch import save_file

import sparsetrain
from sparsetrain import SparsetrainError, apply_mask_, create_model, load_mask, prune_at_init, save_mask
from sparsetrain.fsio import simulate_full_disk
from sparsetrain.masks import GradientMask, Mask

# LeNet-5-Caffe by hand: conv 20x1x5x5 + 20, conv 50x20x5x5 + 50, fc 800x500 + 500, fc 500x10 + 10
LENET5_PARAMETERS = (20 * 25 + 20) + (50 * 20 * 25 + 50) + (800 * 500 + 500) + (500 * 10 + 10)


def lenet5_mask(sparsity=0.98):
    torch.manual_seed(0)
    model = create_model("lenet-5-caffe")
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    return model, prune_at_init(model, "snip", sparsity=sparsity, batches=(x, y))


def file_metadata(path) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def expected_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The checksum as specified: per tensor in name order, [name, shape] as JSON, then one byte
    (0 or 1) per entry."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(json.dumps([name, list(t.shape)]).encode())
        digest.update(bytes(int(v) for v in t.flatten().tolist()))
    return digest.hexdigest()


def data_offsets(path, name: str) -> tuple[int, int]:
    """Byte range of tensor ``name`` in a safetensors file, read from its header by hand."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    start, end = header[name]["data_offsets"]
    return 8 + header_len + start, 8 + header_len + end


def test_a_mask_file_says_what_it_is(tmp_path):
    model, mask = lenet5_mask()
    path = tmp_path / "m.safetensors"
    save_mask(path, mask, model=model, method="snip", source="sparsetrain prune --model lenet-5-caffe")
    meta = file_metadata(path)
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    assert meta["method"] == "snip"
    assert float(meta["sparsity"]) == pytest.approx(1 - kept / total, abs=1e-12)
    assert float(meta["sparsity"]) == pytest.approx(0.98, abs=1e-5)
    assert meta["model"] == type(model).__name__
    assert meta["model_parameters"] == str(LENET5_PARAMETERS) == "431080"
    assert len(meta["model_fingerprint"]) == 16
    assert meta["source"] == "sparsetrain prune --model lenet-5-caffe"
    assert meta["sparsetrain_version"] == sparsetrain.__version__
    assert meta["sha256"] == expected_sha256(mask)

    loaded = load_mask(path, model)
    assert loaded.metadata["method"] == "snip" and loaded.metadata["source"] == str(path)
    assert loaded.metadata["sha256"] == expected_sha256(mask)
    assert float(loaded.metadata["sparsity"]) == pytest.approx(1 - kept / total, abs=1e-12)
    assert set(loaded.metadata) >= {"method", "sparsity", "source", "sha256", "model"}


def test_the_same_mask_has_the_same_checksum_whatever_the_order(tmp_path):
    _, mask = lenet5_mask()
    save_mask(tmp_path / "a.safetensors", mask)
    save_mask(tmp_path / "b.safetensors", Mask(dict(reversed(list(mask.items())))))
    assert file_metadata(tmp_path / "a.safetensors")["sha256"] == file_metadata(tmp_path / "b.safetensors")["sha256"]


def test_a_mask_file_with_overwritten_bytes_is_refused(tmp_path):
    model, mask = lenet5_mask()
    path = tmp_path / "m.safetensors"
    save_mask(path, mask, model=model, method="snip")
    start, end = data_offsets(path, "2.weight")  # the second convolution, 50x20x5x5
    raw = bytearray(path.read_bytes())
    raw[start : start + 4000] = b"\x01" * 4000  # revives up to 4,000 pruned connections
    path.write_bytes(bytes(raw))
    with pytest.raises(SparsetrainError) as info:
        load_mask(path, model)
    message = str(info.value)
    assert message.startswith(f"mask file {path} is damaged: its content does not match the checksum written with it")
    assert "re-create it with `sparsetrain prune`" in message
    with pytest.raises(SparsetrainError, match="is damaged"):
        load_mask(path)  # without a model too


def test_a_mask_file_without_a_checksum_still_loads(tmp_path):
    """Files written before mask files carried a checksum: loaded unchecked, method from their config."""
    model, mask = lenet5_mask()
    path = tmp_path / "old.safetensors"
    save_file({n: m for n, m in mask.items()}, str(path), metadata={
        "sparsetrain.mask_order": json.dumps(list(mask)), "model": "lenet-5-caffe",
        "config": json.dumps({"prune": {"method": "snip", "sparsity": 0.98}})})
    loaded = load_mask(path, model)
    assert list(loaded) == list(mask) and all(torch.equal(loaded[n], mask[n]) for n in mask)
    assert loaded.metadata["method"] == "snip" and loaded.metadata["model"] == "lenet-5-caffe"
    assert loaded.metadata["sha256"] == expected_sha256(mask)


def test_a_mask_for_another_model_names_the_model_it_was_made_for(tmp_path):
    model, mask = lenet5_mask()
    path = tmp_path / "m.safetensors"
    save_mask(path, mask, {"model": "lenet-5-caffe"}, model=model, method="snip")
    other = create_model("lenet-300-100")
    with pytest.raises(SparsetrainError) as info:
        load_mask(path, other)
    message = str(info.value)
    assert message.startswith(f"mask file {path} was made for model 'lenet-5-caffe' (431,080 parameters), not this model")
    assert f"{sum(p.numel() for p in other.parameters()):,} parameters" in message  # 266,610
    assert "'5.weight' has shape (500, 800), the parameter (10, 100)" in message  # the differing tensors
    assert "'0.weight' (20, 1, 5, 5) is not a parameter of the model" in message
    assert "does not fit" in message
    # the same when the mask, loaded alone, meets the model later (train --mask)
    loaded = load_mask(path)
    with pytest.raises(SparsetrainError, match="was made for model 'lenet-5-caffe'"):
        apply_mask_(other, loaded)


def test_a_damaged_mask_file_is_refused_by_the_cli(tmp_path, capsys):
    from sparsetrain.cli.main import main

    path = tmp_path / "m.safetensors"
    assert main(["prune", "--dataset", "synthetic", "--model", "mlp-tiny", "--sparsity", "0.9",
                 "--out", str(path), "--no-progress"]) == 0
    meta = file_metadata(path)
    assert meta["method"] == "snip" and meta["model"] == "mlp-tiny" and meta["source"].startswith("sparsetrain prune")
    start, end = data_offsets(path, "1.weight")
    raw = bytearray(path.read_bytes())
    raw[start:end] = b"\x01" * (end - start)
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    store = tmp_path / "store"
    code = main(["train", "--dataset", "synthetic", "--model", "mlp-tiny", "--iterations", "5", "--mask", str(path),
                 "--store", str(store), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"mask file {path} is damaged" in err and "Traceback" not in err
    assert not store.exists()  # refused before anything was recorded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8, torch.int64, torch.bfloat16])
def test_a_mask_of_zeros_and_ones_in_any_dtype_is_accepted(dtype):
    model = torch.nn.Linear(4, 2)
    bits = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]])
    apply_mask_(model, {"weight": bits.to(dtype)})
    assert torch.equal(model.weight != 0, bits.bool())
    GradientMask(model, {"weight": bits.to(dtype)})


@pytest.mark.parametrize("values, shown", [
    (torch.tensor([[0.5, 0, 1, 1], [1, 1, 1, 0]]), "0.5"),
    (torch.tensor([[2, 0, 1, 1], [1, 1, -1, 0]]), "-1, 2"),
    (torch.tensor([[float("nan"), 0, 1, 1], [1, 1, 1, 0]]), "nan"),
])
def test_a_mask_that_is_neither_boolean_nor_0_1_is_refused(values, shown, tmp_path):
    model = torch.nn.Linear(4, 2)
    before = model.weight.detach().clone()
    with pytest.raises(SparsetrainError) as info:
        apply_mask_(model, {"weight": values})
    message = str(info.value)
    assert "'weight'" in message and shown in message and "boolean" in message and "only 0 and 1" in message
    assert torch.equal(model.weight, before)  # nothing changed
    with pytest.raises(SparsetrainError, match="'weight'"):
        save_mask(tmp_path / "m.safetensors", {"weight": values})
    assert not (tmp_path / "m.safetensors").exists()
    # a file someone else wrote with such values is refused on load, naming the file
    save_file({"weight": values.contiguous()}, str(tmp_path / "float.safetensors"))
    with pytest.raises(SparsetrainError, match=f"mask file {tmp_path / 'float.safetensors'}: tensor 'weight'"):
        load_mask(tmp_path / "float.safetensors")


def test_a_float_mask_is_refused_by_run_before_training(tmp_path):
    from sparsetrain import RunConfig, run

    config = RunConfig(model="mlp-tiny", dataset="synthetic").replace(train={"iterations": 5})
    model = create_model("mlp-tiny")
    mask = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters() if p.dim() == 2}
    with pytest.raises(SparsetrainError, match="holds 0.5"):
        run(config, store=None, progress=False, mask=mask)


def test_a_full_disk_keeps_the_previous_mask_file(tmp_path):
    model, mask = lenet5_mask()
    path = tmp_path / "m.safetensors"
    save_mask(path, mask, model=model, method="snip")
    before = path.read_bytes()
    with simulate_full_disk("mask"), pytest.raises(SparsetrainError, match="cannot write the mask"):
        save_mask(path, mask, model=model, method="random")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


def test_train_with_a_mask_records_and_prints_the_masks_method_and_sparsity(tmp_path, capsys):
    """Not the config's default snip at 95%: the mask file's random at its real 98%."""
    from sparsetrain.cli.main import main
    from sparsetrain.store import RunStore

    path = tmp_path / "random.safetensors"
    tiny = ["--dataset", "synthetic", "--model", "mlp-tiny", "--no-progress"]
    assert main(["prune", *tiny, "--method", "random", "--sparsity", "0.98", "--out", str(path)]) == 0
    mask = load_mask(path)
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    assert total == 784 * 32 + 32 * 10 and kept == round(total * 0.02)  # mlp-tiny's weights, by hand
    capsys.readouterr()
    store = tmp_path / "store"
    assert main(["train", *tiny, "--iterations", "5", "--val-every", "5", "--mask", str(path), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"random at {1 - kept / total:.2%} sparsity" in out and "98.00%" in out and "snip" not in out
    (record,) = RunStore(store).list()
    assert record.config["prune"]["method"] == "random"
    assert record.config["prune"]["sparsity"] == pytest.approx(1 - kept / total, abs=1e-12)
    assert record.results["sparsity"] == pytest.approx(1 - kept / total, abs=1e-12)
