"""alpha_schedule: diffusers TokenDiffusionScheduler's α(t) families."""

import math

import pytest
import torch

import ddiff
from ddiff.ops import alpha_schedule

KINDS = ["log_linear", "linear", "cosine", "geometric"]


def expected(t: float, kind: str, eps: float = 1e-3, smin: float = 1e-4, smax: float = 20.0) -> float:
    """The formulas restated independently (float64)."""
    if kind == "log_linear":
        return 1 - (1 - eps) * t
    if kind == "linear":
        return eps + (1 - 2 * eps) * (1 - t)
    if kind == "cosine":
        return eps + (1 - 2 * eps) * (1 - math.sin(math.pi / 2 * t))  # cos(π/2 (1-t)) = sin(π/2 t)
    return math.exp(-math.exp((1 - t) * math.log(smin) + t * math.log(smax)))


@pytest.mark.parametrize("kind", KINDS)
def test_values_float_and_tensor(kind):
    ts = [0.0, 1e-6, 0.1, 0.25, 0.5, 0.75, 0.999, 1.0]
    for eps in (1e-3, 0.05):
        for t in ts:
            got = alpha_schedule(t, kind, eps)
            assert isinstance(got, float)
            assert got == pytest.approx(expected(t, kind, eps), rel=1e-12, abs=1e-15)
        tt = torch.tensor(ts, dtype=torch.float64)
        out = alpha_schedule(tt, kind, eps)
        assert out.dtype == torch.float64 and out.shape == tt.shape
        want = torch.tensor([expected(t, kind, eps) for t in ts], dtype=torch.float64)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_endpoints_and_monotone(kind):
    eps = 1e-3
    a0, a1 = alpha_schedule(0.0, kind, eps), alpha_schedule(1.0, kind, eps)
    if kind == "log_linear":
        assert a0 == 1.0 and a1 == pytest.approx(eps)
    elif kind in ("linear", "cosine"):
        assert a0 == pytest.approx(1 - eps) and a1 == pytest.approx(eps)
    else:
        assert a0 == pytest.approx(math.exp(-1e-4)) and a1 == pytest.approx(math.exp(-20.0))
    t = torch.linspace(0, 1, 257, dtype=torch.float64)
    a = alpha_schedule(t, kind, eps)
    assert torch.all(a[1:] < a[:-1])
    assert torch.all((a > 0) & (a <= 1))


def test_dtypes_and_shapes():
    t = torch.rand(3, 4)
    for kind in KINDS:
        out = alpha_schedule(t, kind)
        assert out.dtype == torch.float32 and out.shape == (3, 4)
        torch.testing.assert_close(out, alpha_schedule(t.double(), kind).float())
        half = alpha_schedule(t.half(), kind)
        assert half.dtype == torch.float16
    ints = alpha_schedule(torch.tensor([0, 1]), "linear")
    assert ints.dtype == torch.get_default_dtype()
    torch.testing.assert_close(ints, torch.tensor([1 - 1e-3, 1e-3]))
    assert alpha_schedule(torch.tensor(0.5)).shape == ()
    assert alpha_schedule(torch.empty(0)).shape == (0,)
    assert alpha_schedule(1) == pytest.approx(1e-3)  # Python int t
    assert ddiff.alpha_schedule is alpha_schedule


def test_geometric_sigmas():
    got = alpha_schedule(0.5, "geometric", sigma_min=0.5, sigma_max=2.0)
    assert got == pytest.approx(math.exp(-1.0))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: alpha_schedule(0.5, "sigmoid"), ValueError, "kind"),
        (lambda: alpha_schedule(0.5, None), ValueError, "kind"),
        (lambda: alpha_schedule(-0.1), ValueError, "`t`"),
        (lambda: alpha_schedule(1.5), ValueError, "`t`"),
        (lambda: alpha_schedule(float("nan")), ValueError, "`t`"),
        (lambda: alpha_schedule(torch.tensor([0.2, 1.01])), ValueError, "`t`"),
        (lambda: alpha_schedule(torch.tensor([float("nan")])), ValueError, "`t`"),
        (lambda: alpha_schedule("0.5"), TypeError, "`t`"),
        (lambda: alpha_schedule(True), TypeError, "`t`"),
        (lambda: alpha_schedule(0.5, eps=0.0), ValueError, "eps"),
        (lambda: alpha_schedule(0.5, eps=1.0), ValueError, "eps"),
        (lambda: alpha_schedule(0.5, "geometric", sigma_min=2.0, sigma_max=1.0), ValueError, "sigma_min"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
