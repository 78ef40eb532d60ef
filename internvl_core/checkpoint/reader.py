"""Read tensors from an original checkpoint folder, only the ones asked for.

Handles `model.safetensors`, sharded `model-0000k-of-0000n.safetensors` + index, and
`pytorch_model*.bin` (+ index). A pipeline stage asks for its own keys and never loads the rest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from internvl_core.errors import CheckpointError

logger = logging.getLogger(__name__)

# Buffers some exports carry that no module of ours owns.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointReader:
    """Index of tensor name -> file for one checkpoint folder; loads tensors lazily."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint folder {self.path} does not exist")
        # Keeps the last .bin file read (they load whole); safetensors are read lazily.
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self._key_to_file = self._index()

    def _index(self) -> dict[str, Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                missing = {f for f in weight_map.values() if not (self.path / f).is_file()}
                if missing:
                    raise CheckpointError(f"{index} names shard files that are absent: {missing}")
                return {k: self.path / f for k, f in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            mapping: dict[str, Path] = {}
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    mapping.update(dict.fromkeys(handle.keys(), file))
            return mapping
        bins = sorted(self.path.glob("pytorch_model*.bin"))
        if bins:
            mapping = {}
            for file in bins:
                mapping.update(dict.fromkeys(self._load_bin(file), file))
            return mapping
        raise CheckpointError(
            f"{self.path} has no *.safetensors, model.safetensors.index.json or pytorch_model*.bin"
        )

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bin_cache:
            self._bin_cache = {file: torch.load(file, map_location="cpu", weights_only=True)}
        return self._bin_cache[file]

    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return sorted(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def load(
        self,
        keys: Iterable[str] | Callable[[str], bool],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        desc: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Load the named tensors (or those a predicate accepts), grouped by file.

        Raises CheckpointError listing every requested key that the checkpoint lacks.
        """
        if callable(keys):
            wanted = [k for k in self._key_to_file if keys(k)]
        else:
            wanted = list(keys)
            missing = sorted(k for k in wanted if k not in self._key_to_file)
            if missing:
                raise CheckpointError(
                    f"checkpoint {self.path} lacks {len(missing)} tensors: {missing[:20]}"
                )
        by_file: dict[Path, list[str]] = {}
        for key in wanted:
            by_file.setdefault(self._key_to_file[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        files = tqdm(sorted(by_file), desc=desc, disable=desc is None or len(by_file) < 2)
        for file in files:
            out.update(self._read_file(file, by_file[file], dtype=dtype, device=device))
        return out

    def _read_file(
        self,
        file: Path,
        keys: list[str],
        *,
        dtype: torch.dtype | None,
        device: torch.device | str,
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt", device="cpu") as handle:
                for key in keys:
                    out[key] = _cast(handle.get_tensor(key), dtype, device)
        else:
            state = self._load_bin(file)
            for key in keys:
                out[key] = _cast(state[key], dtype, device)
        return out

    def load_prefix(
        self,
        prefix: str,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Load every tensor under `prefix`, with the prefix stripped from the names."""
        loaded = self.load(
            lambda k: k.startswith(prefix) and not k.endswith(IGNORED_SUFFIXES),
            dtype=dtype,
            device=device,
        )
        return {k[len(prefix) :]: v for k, v in loaded.items()}


def _cast(
    tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str
) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.to(device)


def load_into_module(module: nn.Module, tensors: dict[str, torch.Tensor], *, context: str) -> None:
    """Copy `tensors` into `module` by parameter/buffer name; fail listing missing/unexpected keys.

    Shapes must match exactly. Buffers that are not persistent are not expected.
    """
    own = dict(module.named_parameters())
    own.update({k: v for k, v in module.named_buffers() if _is_persistent(module, k)})
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{context}: {len(missing)} missing keys {missing[:20]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:20]}"
        )
    with torch.no_grad():
        for name, target in own.items():
            source = tensors[name]
            if tuple(source.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{context}: {name} has shape {tuple(source.shape)} in the checkpoint, "
                    f"expected {tuple(target.shape)}"
                )
            target.copy_(source.to(dtype=target.dtype, device=target.device))


def _is_persistent(module: nn.Module, name: str) -> bool:
    owner_name, _, buffer_name = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return buffer_name not in owner._non_persistent_buffers_set
