"""oneDNN pre-packed CPU linears: same results as nn.Linear, swapped only where they qualify."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from internvl_core.model import cpu_linear
from internvl_core.model.cpu_linear import PackedLinear, prepack_linears

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"
)


@pytest.mark.parametrize("rows", [0, 1, 7, 32, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_matches_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias)
    x = torch.randn(rows, 96)  # [N, in]
    want = linear(x)  # [N, out]
    got = PackedLinear(linear)(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5 if rows else True


def test_prepack_swaps_plain_linears_and_keeps_ties() -> None:
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 50))
    model[3].weight = model[0].weight  # a head tied to the embedding
    x = torch.randint(0, 50, (5,))
    with torch.inference_mode():
        want = model(x)
        assert prepack_linears(model) == 2
        got = model(x)
    assert isinstance(model[1], PackedLinear) and isinstance(model[3], PackedLinear)
    assert model[3].weight is model[0].weight
    assert (got - want).abs().max().item() <= 1e-5
    assert "1.weight" in model.state_dict()  # the original parameters stay reachable


def test_prepack_skips_other_dtypes_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    half = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    assert prepack_linears(half) == 0
    monkeypatch.setenv(cpu_linear.ENV_SWITCH, "0")
    assert prepack_linears(nn.Sequential(nn.Linear(8, 8))) == 0


def test_packed_linear_traces_under_compile() -> None:
    linear = PackedLinear(nn.Linear(16, 8))
    compiled = torch.compile(linear, fullgraph=True, backend="eager")
    x = torch.randn(3, 16)
    assert (compiled(x) - linear(x)).abs().max().item() <= 1e-5
