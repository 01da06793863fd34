"""Reading and writing safetensors checkpoint folders: single file, shards with an index, bad folders."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from league.checkpoint.safetensors import (
    INDEX_FILE,
    SINGLE_FILE,
    TensorSpec,
    iter_tensors,
    list_tensors,
    plan_shards,
    staged_folder,
    write_tensors,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=gen),
        "b.bf16": torch.randn(3, 4, 2, generator=gen).bfloat16(),
        "c.half": torch.randn(11, generator=gen).half(),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
    }


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name=k, shape=tuple(v.shape), dtype=v.dtype) for k, v in tensors.items()]


def test_single_file_round_trip_readable_by_safetensors(tmp_path):
    tensors = sample_tensors()
    files = write_tensors(tmp_path, specs_of(tensors), iter(tensors.values()))
    assert files == [SINGLE_FILE]
    official = load_file(tmp_path / SINGLE_FILE)
    listing = list_tensors(tmp_path)
    assert list(listing) == list(tensors)
    read = {info.name: t for info, t in iter_tensors(listing.values())}
    for name, t in tensors.items():
        assert listing[name].shape == tuple(t.shape)
        for other in (official[name], read[name]):
            assert other.dtype == t.dtype and torch.equal(other, t), name


def test_shards_have_published_names_and_an_index(tmp_path):
    tensors = {f"t{i}": torch.full((10, 10), float(i)) for i in range(7)}  # 400 bytes each
    files = write_tensors(tmp_path, specs_of(tensors), iter(tensors.values()), max_shard_bytes=1000)
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + [INDEX_FILE]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 7 * 400
    assert index["weight_map"]["t0"] == "model-00001-of-00004.safetensors"
    assert index["weight_map"]["t6"] == "model-00004-of-00004.safetensors"
    for name in files[:-1]:
        assert (tmp_path / name).stat().st_size < 1000 + 200
    read = {info.name: t for info, t in iter_tensors(list_tensors(tmp_path).values())}
    assert read.keys() == tensors.keys()
    assert all(torch.equal(read[k], v) for k, v in tensors.items())


def test_a_tensor_over_the_limit_gets_its_own_shard():
    specs = [TensorSpec(name=n, shape=(s,), dtype=torch.float32) for n, s in [("a", 10), ("b", 1000), ("c", 10)]]
    assert [[s.name for s in shard] for shard in plan_shards(specs, 100)] == [["a"], ["b"], ["c"]]
    assert [[s.name for s in shard] for shard in plan_shards(specs, 10_000)] == [["a", "b", "c"]]


def test_tensors_not_matching_their_specs_are_refused(tmp_path):
    spec = [TensorSpec(name="x", shape=(2, 3), dtype=torch.float32)]
    with pytest.raises(ValueError, match=r"'x' is torch.float32 \[3, 2\].*\[2, 3\]"):
        write_tensors(tmp_path, spec, iter([torch.zeros(3, 2)]))
    with pytest.raises(ValueError, match="fewer tensors"):
        write_tensors(tmp_path, spec, iter([]))
    with pytest.raises(ValueError, match="more tensors"):
        write_tensors(tmp_path, spec, iter([torch.zeros(2, 3), torch.zeros(1)]))


def test_missing_folder_or_files(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        list_tensors(tmp_path / "nope")
    with pytest.raises(ValueError, match=f"{tmp_path}: no model.safetensors and no {INDEX_FILE}"):
        list_tensors(tmp_path)


@pytest.mark.parametrize(
    "index, message",
    [
        ("{not json", "not valid JSON"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": {"a": 3}}', "weight_map"),
        ('{"weight_map": {"a": "model-00009-of-00009.safetensors"}}', "'a' is in 'model-00009-of-00009.safetensors'"),
        ('{"weight_map": {"zzz": "model-00001-of-00001.safetensors"}}', "'zzz' is said to be in"),
    ],
)
def test_malformed_index(tmp_path, index, message):
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / INDEX_FILE).write_text(index)
    with pytest.raises(ValueError, match=message) as info:
        list_tensors(tmp_path)
    assert INDEX_FILE in str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "short"])
def test_malformed_safetensors_file(tmp_path, damage):
    save_file({"a": torch.zeros(100)}, tmp_path / SINGLE_FILE)
    data = (tmp_path / SINGLE_FILE).read_bytes()
    broken = {"garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", "truncated": data[:-50], "short": b"abc"}
    (tmp_path / SINGLE_FILE).write_bytes(broken[damage])
    with pytest.raises(ValueError, match=f"{tmp_path / SINGLE_FILE}: "):
        list_tensors(tmp_path)


def test_staged_folder_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_folder(target) as stage:
        (stage / "config.json").write_text("{}")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_staged_folder_refuses_a_non_empty_target_unless_forced(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with staged_folder(target) as stage:  # an empty folder is fine
        (stage / "a").write_text("1")
    with pytest.raises(ValueError, match="not empty"), staged_folder(target):
        pass
    with staged_folder(target, force=True) as stage:
        (stage / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
