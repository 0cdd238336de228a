"""DINOHead and its weight-normalised prototype layer."""

from __future__ import annotations

import pytest
import torch

from fedmri.models import DINOHead, WeightNormLinear


@pytest.mark.parametrize(("nlayers", "n_linear"), [(1, 1), (2, 2), (3, 3)])
def test_shapes_and_depth(nlayers: int, n_linear: int) -> None:
    head = DINOHead(32, 50, hidden_dim=24, bottleneck_dim=8, nlayers=nlayers)
    assert head(torch.randn(4, 32)).shape == (4, 50)
    assert head(torch.randn(2, 3, 32)).shape == (2, 3, 50)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == n_linear


def test_logits_are_cosines_to_prototypes() -> None:
    torch.manual_seed(0)
    head = DINOHead(16, 10, hidden_dim=12, bottleneck_dim=6)
    x = torch.randn(5, 16)
    z = head.mlp(x)
    v = head.last_layer.weight_v
    expected = torch.stack([torch.stack([torch.dot(zi, vk) / (zi.norm() * vk.norm()) for vk in v]) for zi in z])
    torch.testing.assert_close(head(x), expected)
    # Rescaling a prototype's raw weights changes nothing (weight norm, gain fixed at 1).
    with torch.no_grad():
        head.last_layer.weight_v[3] *= 7.0
    torch.testing.assert_close(head(x), expected)


def test_learnt_gain_scales_rows() -> None:
    layer = WeightNormLinear(4, 3, learn_gain=True)
    with torch.no_grad():
        layer.weight_g.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.tensor([1.0, 2.0, 3.0]))
    assert WeightNormLinear(4, 3).weight_g is None


@pytest.mark.parametrize("bad", ["in_dim", "out_dim", "hidden_dim", "bottleneck_dim", "nlayers"])
def test_illegal_arguments(bad: str) -> None:
    kwargs = dict(in_dim=8, out_dim=8, hidden_dim=8, bottleneck_dim=8, nlayers=2) | {bad: 0}
    with pytest.raises(ValueError, match=bad):
        DINOHead(**kwargs)
