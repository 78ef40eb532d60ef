"""pixel_shuffle token order (v1 / v2) and the mlp1 Projector against transformers' port."""

from __future__ import annotations

import pytest
import torch

from internvl_core.errors import InternVLError
from internvl_core.vision.projector import Projector, pixel_shuffle


def _grid(num_rows: int, num_cols: int, channels: int) -> torch.Tensor:
    """x[0, r, c, k] = 1000 * r + 10 * c + k, so every value names its source patch and channel."""
    rows = torch.arange(num_rows).view(num_rows, 1, 1) * 1000  # [h, 1, 1]
    cols = torch.arange(num_cols).view(1, num_cols, 1) * 10  # [1, w, 1]
    chans = torch.arange(channels).view(1, 1, channels)  # [1, 1, C]
    return (rows + cols + chans).unsqueeze(0).float()  # [1, h, w, C]


def _expected_token(x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """Channels of output token (row pair i, column pair j), written out by hand."""
    patches = [x[0, 2 * i, 2 * j], x[0, 2 * i, 2 * j + 1], x[0, 2 * i + 1, 2 * j]]
    patches.append(x[0, 2 * i + 1, 2 * j + 1])
    return torch.cat(patches)  # [4C]


def test_token_order_v2_row_major_v1_column_major() -> None:
    x = _grid(4, 4, 2)  # [1, 4, 4, 2]
    v2 = pixel_shuffle(x, 0.5, "v2").reshape(1, -1, 8)  # [1, 4, 8]
    v1 = pixel_shuffle(x, 0.5, "v1").reshape(1, -1, 8)  # [1, 4, 8]
    num_pairs = 2
    for i in range(num_pairs):
        for j in range(num_pairs):
            want = _expected_token(x, i, j)  # [8]
            torch.testing.assert_close(v2[0, i * num_pairs + j], want, atol=0, rtol=0)
            torch.testing.assert_close(v1[0, j * num_pairs + i], want, atol=0, rtol=0)
    # Spelled out once: token 1 of v2 is row pair 0, column pair 1.
    assert v2[0, 1].tolist() == [20, 21, 30, 31, 1020, 1021, 1030, 1031]
    assert v1[0, 1].tolist() == [2000, 2001, 2010, 2011, 3000, 3001, 3010, 3011]


def test_shapes_on_a_non_square_grid() -> None:
    x = _grid(4, 6, 3)  # [1, 4, 6, 3]
    v2 = pixel_shuffle(x, 0.5, "v2")  # [1, 2, 3, 12]
    v1 = pixel_shuffle(x, 0.5, "v1")  # [1, 3, 2, 12]
    assert v2.shape == (1, 2, 3, 12)
    assert v1.shape == (1, 3, 2, 12)  # v1 leaves the grid transposed
    torch.testing.assert_close(v1.transpose(1, 2), v2, atol=0, rtol=0)
    torch.testing.assert_close(v2[0, 1, 2], _expected_token(x, 1, 2), atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(3, 4, 4, 32), (2, 32, 32, 8), (1, 4, 6, 4)])
def test_v2_matches_transformers(shape: tuple[int, int, int, int]) -> None:
    from transformers import InternVLModel

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # [n, h, w, C]
    # transformers' pixel_shuffle does not touch `self`; it always swaps back (= v2).
    want = InternVLModel.pixel_shuffle(None, x, scale_factor=0.5)  # [n, h/2, w/2, 4C]
    torch.testing.assert_close(pixel_shuffle(x, 0.5, "v2"), want, atol=0, rtol=0)


def test_indivisible_grid_names_the_ratio() -> None:
    with pytest.raises(InternVLError, match=r"downsample_ratio 0\.5"):
        pixel_shuffle(torch.zeros(1, 3, 3, 4), 0.5, "v2")


def test_projector_names_and_shapes() -> None:
    projector = Projector(32, 64, downsample_ratio=0.5)
    shapes = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    assert shapes == {
        "0.weight": (128,),
        "0.bias": (128,),
        "1.weight": (64, 128),
        "1.bias": (64,),
        "3.weight": (64, 64),
        "3.bias": (64,),
    }
    assert projector[0].eps == 1e-5
    assert projector[2].approximate == "none"


def test_projector_matches_transformers() -> None:
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

    gen = torch.Generator().manual_seed(1)
    projector = Projector(32, 64, downsample_ratio=0.5).eval()
    with torch.no_grad():
        for _, param in sorted(projector.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)  # [*param.shape]
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(hidden_size=32, num_attention_heads=2),
        text_config=Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
        downsample_ratio=0.5,
    )
    reference = InternVLMultiModalProjector(config).eval()
    renamed = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
    reference.load_state_dict(
        {
            f"{renamed[k.split('.')[0]]}.{k.split('.')[1]}": v
            for k, v in projector.state_dict().items()
        },
        strict=True,
    )
    tokens = torch.randn(3, 4, 128, generator=gen)  # [n, tokens, 4C]
    with torch.no_grad():
        torch.testing.assert_close(projector(tokens), reference(tokens), atol=1e-5, rtol=1e-5)
