"""Every registered schedule: boundary values, monotonicity, α′ against a finite difference, the
inverse t_for_alpha, and the one shared NELBO weight −α′/(1−α)."""

import math

import pytest
import torch

from diffuse.registry import SCHEDULES
from diffuse.schedules import build_schedule

NAMES = SCHEDULES.names()
T = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
INNER = T[1:-1]


def test_the_two_documented_schedules_exist():
    assert {"linear", "cosine"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_boundaries(name):
    s = build_schedule(name)
    assert float(s.alpha(torch.tensor(0.0, dtype=torch.float64))) == pytest.approx(1.0, abs=1e-12)
    assert float(s.alpha(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_monotone_decreasing_in_unit_interval(name):
    a = build_schedule(name).alpha(T)
    assert torch.all(a[1:] < a[:-1])
    assert torch.all((a >= -1e-12) & (a <= 1 + 1e-12))


@pytest.mark.parametrize("name", NAMES)
def test_alpha_prime_matches_finite_difference(name):
    s = build_schedule(name)
    h = 1e-6
    fd = (s.alpha(INNER + h) - s.alpha(INNER - h)) / (2 * h)
    torch.testing.assert_close(s.alpha_prime(INNER), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_t_for_alpha_inverts_alpha(name):
    s = build_schedule(name)
    torch.testing.assert_close(s.t_for_alpha(s.alpha(T)), T, rtol=0, atol=1e-6)
    alphas = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    torch.testing.assert_close(s.alpha(s.t_for_alpha(alphas)), alphas, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    s = build_schedule(name)
    torch.testing.assert_close(s.weight(INNER), -s.alpha_prime(INNER) / (1 - s.alpha(INNER)))
    assert torch.all(s.weight(INNER) > 0)


def test_documented_closed_forms():
    t = INNER
    torch.testing.assert_close(build_schedule("linear").weight(t), 1 / t)
    cos = (math.pi / 2) * torch.sin(math.pi * t / 2) / (1 - torch.cos(math.pi * t / 2))
    torch.testing.assert_close(build_schedule("cosine").weight(t), cos)


@pytest.mark.parametrize("name", NAMES)
def test_inference_grid_runs_from_one_to_eps(name):
    g = build_schedule(name).grid(8, eps=1e-3)
    assert len(g) == 9 and float(g[0]) == 1.0 and float(g[-1]) == pytest.approx(1e-3)
    assert torch.all(g[1:] < g[:-1])


def test_schedule_from_mapping_and_unknown_name():
    from diffuse.errors import DiffuseError

    assert type(build_schedule({"name": "cosine"})) is type(build_schedule("cosine"))
    with pytest.raises(DiffuseError, match="linear"):
        build_schedule("nope")


def _reveals(name: str, tokens: int = 64, steps: int = 8) -> list[int]:
    s, left, out = build_schedule(name), tokens, []
    grid = s.grid(steps, 1e-3)
    for i in range(steps):
        a_t, a_s = s.alpha(grid[i]), s.alpha(grid[i + 1])
        k = left if i == steps - 1 else round(left * float(1 - (1 - a_s) / (1 - a_t)))
        out.append(k)
        left -= k
    return out


def test_step_schedules_front_load_as_documented():
    assert _reveals("linear") == [8] * 8
    cos, maskgit = _reveals("cosine"), _reveals("cosine_maskgit")
    assert cos[0] > 8 > maskgit[0]  # MDLM cosine commits many tokens early; MaskGIT cosine few
    assert cos == sorted(cos, reverse=True) and maskgit == sorted(maskgit)
