"""CheckpointReader: single, sharded and .bin folders; partial loads; strict module loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from internvl_core.checkpoint import CheckpointReader, load_into_module
from internvl_core.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(3, 4, generator=gen) for i in range(4)}


def test_single_file_and_predicate(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert reader.keys() == sorted(tensors)
    part = reader.load(lambda k: k.startswith("layers.1"), dtype=torch.bfloat16)
    assert list(part) == ["layers.1.weight"]
    assert part["layers.1.weight"].dtype == torch.bfloat16


def test_sharded_index_loads_only_needed_shards(tmp_path: Path) -> None:
    tensors = _tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2]}
    shards["model-00002-of-00002.safetensors"] = names[2:]
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(keys, file))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    reader = CheckpointReader(tmp_path)
    # Remove the first shard: loading keys of the second must still work (never opened).
    (tmp_path / "model-00001-of-00002.safetensors").unlink()
    out = reader.load([names[3]])
    torch.testing.assert_close(out[names[3]], tensors[names[3]])


def test_bin_and_prefix(tmp_path: Path) -> None:
    tensors = {"a.x": torch.ones(2), "a.rotary_emb.inv_freq": torch.ones(1), "b.y": torch.zeros(1)}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.load_prefix("a.")) == ["x"]


def test_missing_keys_listed(tmp_path: Path) -> None:
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="nope"):
        CheckpointReader(tmp_path).load(["nope", "layers.0.weight"])
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        CheckpointReader(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


def test_load_into_module_strict() -> None:
    module = nn.Linear(4, 3)
    good = {"weight": torch.ones(3, 4), "bias": torch.zeros(3)}
    load_into_module(module, good, context="lin")
    assert torch.equal(module.weight, torch.ones(3, 4))
    with pytest.raises(CheckpointError, match=r"missing keys \['bias'\]"):
        load_into_module(module, {"weight": torch.ones(3, 4)}, context="lin")
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_into_module(module, {**good, "extra": torch.ones(1)}, context="lin")
    with pytest.raises(CheckpointError, match="shape"):
        load_into_module(module, {"weight": torch.ones(4, 4), "bias": torch.zeros(3)}, context="l")
