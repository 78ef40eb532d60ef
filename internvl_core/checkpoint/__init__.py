"""Reading original InternVL checkpoint folders (config.json + safetensors / .bin shards)."""

from internvl_core.checkpoint.reader import CheckpointReader, load_into_module

__all__ = ["CheckpointReader", "load_into_module"]
