"""Vision tower: InternViT (300M and 6B layouts), pixel shuffle v1/v2 and the mlp1 projector.

`VisionEncoder` turns pixel tiles `[n_tiles, 3, S, S]` into LLM-width embeddings.
"""

from internvl_core.vision.encoder import VisionEncoder
from internvl_core.vision.intern_vit import InternViT
from internvl_core.vision.projector import Projector, pixel_shuffle

__all__ = ["InternViT", "Projector", "VisionEncoder", "pixel_shuffle"]
