"""Local site-level DP: the site's update clipped and noised before it leaves, and its ε."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedmri.client.privacy.gate import PrivacyGate
from fedmri.client.privacy.ledger import PrivacyLedger
from fedmri.client.privacy.site_dp import privatize_update
from fedmri.client.site import load_site
from fedmri.protocol import TrainRequest

SHAPES = {"encoder.weight": (4, 3), "encoder.bias": (3,), "logit_scale": ()}


def _down(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=g) for key, shape in SHAPES.items()}


def _direction(seed: int) -> dict[str, torch.Tensor]:
    """A delta of L2 norm 1 over all keys (float64)."""
    g = torch.Generator().manual_seed(seed)
    raw = {key: torch.randn(shape, generator=g, dtype=torch.float64) for key, shape in SHAPES.items()}
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in raw.values()))
    return {key: v / norm for key, v in raw.items()}


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))


def test_clipping_bounds_the_norm_and_keeps_the_direction() -> None:
    # Prepare: a delta of norm 4 against a bound of 0.5, no noise.
    down, direction = _down(), _direction(1)
    up = {key: (down[key].double() + 4.0 * direction[key]).float() for key in SHAPES}
    # Execute
    out, norm = privatize_update(down, up, 0.5, 0.0, torch.Generator())
    # Assert
    delta = {key: out[key].double() - down[key].double() for key in SHAPES}
    assert norm == pytest.approx(4.0, rel=1e-6)
    assert _norm(delta) == pytest.approx(0.5, rel=1e-5)
    for key in SHAPES:
        torch.testing.assert_close(delta[key], 0.5 * direction[key], atol=1e-6, rtol=0)
        assert out[key].dtype == torch.float32 and out[key].shape == SHAPES[key]


def test_a_small_update_passes_unchanged_before_noise() -> None:
    down, direction = _down(), _direction(2)
    up = {key: (down[key].double() + 0.1 * direction[key]).float() for key in SHAPES}
    out, norm = privatize_update(down, up, 1.0, 0.0, torch.Generator())
    assert norm == pytest.approx(0.1, rel=1e-5)
    assert all(torch.equal(out[key], up[key]) for key in SHAPES)
    same, zero = privatize_update(down, down, 1.0, 0.0, torch.Generator())
    assert zero == 0.0 and all(torch.equal(same[key], down[key]) for key in SHAPES)


def test_noise_has_std_z_c() -> None:
    down = {"w": torch.randn(200_000, generator=torch.Generator().manual_seed(0))}
    out, _ = privatize_update(down, {"w": down["w"].clone()}, 0.3, 1.5, torch.Generator().manual_seed(1))
    noise = out["w"].double() - down["w"].double()
    assert float(noise.std()) == pytest.approx(1.5 * 0.3, rel=0.02)
    assert abs(float(noise.mean())) < 5e-3


def test_noise_comes_from_the_generator_passed_in() -> None:
    down = _down()
    runs = [privatize_update(down, down, 1.0, 1.0, torch.Generator().manual_seed(s))[0] for s in (5, 5, 6)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in SHAPES)
    assert not torch.equal(runs[0]["encoder.weight"], runs[2]["encoder.weight"])


def test_only_the_keys_of_up_come_back_and_integers_pass_through() -> None:
    down = _down() | {"steps": torch.tensor(3), "frozen": torch.zeros(2)}
    up = {"encoder.weight": down["encoder.weight"] + 3.0, "steps": torch.tensor(7)}
    out, norm = privatize_update(down, up, 1.0, 0.5, torch.Generator().manual_seed(0))
    assert set(out) == {"encoder.weight", "steps"}
    assert norm == pytest.approx(3.0 * math.sqrt(12), rel=1e-5)
    assert torch.equal(out["steps"], torch.tensor(7))
    assert torch.equal(down["encoder.weight"] + 3.0, up["encoder.weight"])  # the inputs are not modified


@pytest.mark.parametrize("change, match", [("extra", "'stray'"), ("shape", "'encoder.bias'"), ("nan", "nan"),
                                           ("clip", "clip_norm"), ("noise", "noise_multiplier")])
def test_bad_arguments_are_refused(change: str, match: str) -> None:
    down, up, clip, noise = _down(), _down(), 1.0, 1.0
    if change == "extra":
        up["stray"] = torch.zeros(1)
    elif change == "shape":
        up["encoder.bias"] = torch.zeros(4)
    elif change == "nan":
        up["encoder.bias"] = torch.full((3,), float("nan"))
    elif change == "clip":
        clip = 0.0
    else:
        noise = -1.0
    with pytest.raises(ValueError, match=match):
        privatize_update(down, up, clip, noise, torch.Generator())


def test_the_ledger_composes_local_site_dp_as_the_gaussian_at_half_the_noise(site_file, request_values,
                                                                           tmp_path) -> None:
    # Replace-one adjacency: two clipped updates are up to 2C apart, so z acts as z / 2.
    site, ledger = load_site(site_file), tmp_path / "ledger.sqlite"
    accountant = RDPAccountant()
    for round_ in range(1, 8):
        request = TrainRequest.from_config(request_values("align", round=round_, site_dp="local",
                                                          site_dp_noise_multiplier=1.2, site_dp_clip_norm=1.0))
        gate = PrivacyGate(site, request, ledger_path=ledger)
        gate.plan_site_level()
        entry = gate.record()[-1]
        accountant.step(noise_multiplier=0.6, sample_rate=1.0)
        assert entry.epsilon_run == pytest.approx(accountant.get_epsilon(1e-5), abs=1e-6)
    with PrivacyLedger(ledger) as book:
        assert book.epsilon(1e-5, run="test") == pytest.approx(accountant.get_epsilon(1e-5), abs=1e-6)
