"""`python -m internvl_core.demo --model DIR`: the model card's quick start on a checkpoint folder.

Runs a text chat, a two-round image chat and a batch_chat with a generated image, and logs them.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from PIL import Image

from internvl_core.chat import InternVLChat

logger = logging.getLogger("internvl_core.demo")


def _synthetic_image(width: int = 640, height: int = 480) -> Image.Image:
    """A deterministic gradient picture so the demo needs no files."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="checkpoint folder (original format)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    model = InternVLChat.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    logger.info("loaded %s in %.1f s", args.model, time.perf_counter() - start)
    config = {"max_new_tokens": args.max_new_tokens, "do_sample": False}

    response, history = model.chat(None, "Hello, who are you?", config, return_history=True)
    logger.info("User: Hello, who are you?\nAssistant: %s", response)
    pixel_values = model.load_image(_synthetic_image(), max_num=6)
    question = "<image>\nPlease describe the image shortly."
    response, history = model.chat(pixel_values, question, config, return_history=True)
    logger.info("User: %s\nAssistant: %s (%d tiles)", question, response, len(pixel_values))
    response, history = model.chat(
        pixel_values, "Please write a poem.", config, history=history, return_history=True
    )
    logger.info("User: Please write a poem.\nAssistant: %s", response)
    responses = model.batch_chat(
        pixel_values.repeat(2, 1, 1, 1),
        ["Describe it.", "What colour?"],
        config,
        num_patches_list=[len(pixel_values)] * 2,
    )
    logger.info("batch_chat: %s", responses)


if __name__ == "__main__":
    main()
