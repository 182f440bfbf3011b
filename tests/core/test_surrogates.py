"""The per-token objectives against the paper's equations, written out independently here."""

import math

import pytest
import torch

from cfpo_loss import OBJECTIVES, cfpo_surrogate, clipped_surrogate, reference
from cfpo_loss.surrogates import cfpo_terms, clipped_terms


def cfpo_surrogate_grad(ratio, advantages, eps_low, eps_high):
    """The analytic dJ/dr every loss path runs (``cfpo_terms(...).derivative``)."""
    return cfpo_terms(ratio, advantages, eps_low, eps_high).derivative


def clipped_surrogate_grad(ratio, advantages, eps_low, eps_high, dual_clip=None):
    return clipped_terms(ratio, advantages, eps_low, eps_high, dual_clip).derivative


def paper_cfpo(r: float, a: float, eps_low: float, eps_high: float) -> float:
    eps = eps_high if a > 0 else eps_low
    return r * a - abs(a) / (2 * eps) * (r - 1) ** 2


def paper_clip(r: float, a: float, eps_low: float, eps_high: float, c: float | None = None) -> float:
    j = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
    if c is not None and a < 0:
        j = max(j, c * a)
    return j


RATIOS = [0.0, 0.3, 0.79, 0.8, 0.95, 1.0, 1.05, 1.2, 1.28, 1.5, 3.0, 5.0]
ADVS = [-2.0, -0.5, 0.0, 0.7, 1.5]


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)])
def test_values_match_the_equations(eps_low, eps_high):
    r, a = torch.meshgrid(
        torch.tensor(RATIOS, dtype=torch.float64), torch.tensor(ADVS, dtype=torch.float64), indexing="ij"
    )
    got_cfpo = cfpo_surrogate(r, a, eps_low, eps_high)
    got_clip = clipped_surrogate(r, a, eps_low, eps_high)
    got_dual = clipped_surrogate(r, a, eps_low, eps_high, dual_clip=3.0)
    for i, ri in enumerate(RATIOS):
        for j, aj in enumerate(ADVS):
            assert got_cfpo[i, j].item() == pytest.approx(paper_cfpo(ri, aj, eps_low, eps_high), abs=1e-12)
            assert got_clip[i, j].item() == pytest.approx(paper_clip(ri, aj, eps_low, eps_high), abs=1e-12)
            assert got_dual[i, j].item() == pytest.approx(paper_clip(ri, aj, eps_low, eps_high, 3.0), abs=1e-12)


def test_eps_high_defaults_to_eps_low():
    r, a = torch.tensor([1.3, 0.6]), torch.tensor([1.0, -1.0])
    assert torch.equal(cfpo_surrogate(r, a, 0.25), cfpo_surrogate(r, a, 0.25, 0.25))
    assert torch.equal(clipped_surrogate(r, a, 0.25), clipped_surrogate(r, a, 0.25, 0.25))


@pytest.mark.parametrize(
    "a,eps_low,eps_high", [(1.0, 0.2, 0.28), (2.5, 0.1, 0.3), (-1.0, 0.2, 0.28), (-0.4, 0.15, 0.5)]
)
def test_maximiser_is_one_plus_sign_a_eps(a, eps_low, eps_high):
    expected = 1 + eps_high if a > 0 else 1 - eps_low
    r = torch.linspace(0.0, 2.0, 200_001, dtype=torch.float64)
    j = cfpo_surrogate(r, torch.full_like(r, a), eps_low, eps_high)
    assert r[j.argmax()].item() == pytest.approx(expected, abs=1e-5)
    # and the analytic derivative vanishes exactly there
    g = cfpo_surrogate_grad(
        torch.tensor([expected], dtype=torch.float64), torch.tensor([a], dtype=torch.float64), eps_low, eps_high
    )
    assert g.item() == pytest.approx(0.0, abs=1e-12)


def test_cfpo_is_concave_and_smooth_everywhere():
    r = torch.linspace(0.0, 3.0, 3001, dtype=torch.float64, requires_grad=True)
    for a in (1.0, -1.0):
        j = cfpo_surrogate(r, torch.full_like(r, a), 0.2, 0.28)
        (g,) = torch.autograd.grad(j.sum(), r, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), r)
        eps = 0.28 if a > 0 else 0.2
        assert torch.allclose(h, torch.full_like(h, -abs(a) / eps))  # constant negative curvature


#: every record of the Objective registry and how the tests call it: the dual_clip values it is checked with, and its
#: form in cfpo_loss.reference (None where reference.py does not have it). A record without an entry here fails
#: test_every_objective_is_tested: a new objective's hand-written derivative is held to autograd before it merges.
OBJECTIVE_CASES = {
    "cfpo": {"dual_clips": [None], "reference": lambda r, a, lo, hi, c: reference.cfpo_objective(r, a, lo, hi)},
    "clip": {"dual_clips": [None, 3.0], "reference": reference.clip_objective},
}
OBJECTIVE_RUNS = [
    (name, c) for name in OBJECTIVES for c in OBJECTIVE_CASES.get(name, {"dual_clips": [None]})["dual_clips"]
]


def test_every_objective_is_tested():
    assert set(OBJECTIVE_CASES) == set(OBJECTIVES), "add each Objective record to OBJECTIVE_CASES"


def _objective_inputs():
    torch.manual_seed(0)
    r = (torch.rand(4000, dtype=torch.float64) * 4).requires_grad_()
    a = torch.randn(4000, dtype=torch.float64)
    a[::7] = 0.0
    return r, a


@pytest.mark.parametrize("name, dual_clip", OBJECTIVE_RUNS, ids=[f"{n}-c{c}" for n, c in OBJECTIVE_RUNS])
def test_analytic_derivative_matches_autograd(name, dual_clip):
    """The record's hand-written dJ/dr against autograd through its own value, in float64."""
    r, a = _objective_inputs()
    terms = OBJECTIVES[name].terms(r, a, 0.2, 0.28, dual_clip)
    (auto,) = torch.autograd.grad(terms.objective.sum(), r)
    assert torch.allclose(auto, terms.derivative.detach(), atol=1e-12)


@pytest.mark.parametrize("name, dual_clip", OBJECTIVE_RUNS, ids=[f"{n}-c{c}" for n, c in OBJECTIVE_RUNS])
def test_value_and_derivative_match_the_reference(name, dual_clip):
    """The record's value and hand-written dJ/dr against cfpo_loss.reference's independent form (its value, and
    autograd through it), in float64. Each side evaluates J in at most six roundings of |r·A| + |A|/(2ε)·(r−1)²:
    the two differ by at most twice that, x SAFETY."""
    form = OBJECTIVE_CASES[name]["reference"]
    if form is None:
        pytest.skip(f"cfpo_loss.reference has no {name!r} objective")
    r, a = _objective_inputs()
    terms = OBJECTIVES[name].terms(r.detach(), a, 0.2, 0.28, dual_clip)
    want = form(r, a, 0.2, 0.28, dual_clip)
    (want_derivative,) = torch.autograd.grad(want.sum(), r)
    scale = (r * a).abs() + a.abs() / (2 * 0.2) * (r - 1) ** 2
    bound = reference.SAFETY * 2 * 6 * reference.UNIT_ROUNDOFF[torch.float64] * scale.detach()
    reference.assert_within(terms.objective, want.detach(), bound, f"{name} J vs reference")
    assert torch.allclose(terms.derivative, want_derivative, atol=1e-12)


def test_dual_clip_bounds_negative_advantages_below():
    r = torch.tensor([5.0, 10.0, 2.0])
    a = torch.tensor([-1.0, -2.0, -1.0])
    j = clipped_surrogate(r, a, 0.2, 0.2, dual_clip=3.0)
    assert torch.allclose(j, torch.tensor([-3.0, -6.0, -2.0]))
    # positive advantages are untouched by dual-clip
    jp = clipped_surrogate(torch.tensor([5.0]), torch.tensor([1.0]), 0.2, 0.2, dual_clip=3.0)
    assert jp.item() == pytest.approx(1.2)


def test_clip_boundaries_belong_to_the_trust_region():
    """At r exactly 1 - eps_low, 1 + eps_high or dual_clip, nothing is clipped yet: dJ/dr = A (the one-sided
    derivative from inside; the frameworks' clip fraction counts these tokens as unclipped too, strict >).
    Exact in binary: eps 0.25 / 0.5, c = 3."""
    r = torch.tensor([0.75, 1.5, 3.0, 3.0], dtype=torch.float64)
    a = torch.tensor([-1.0, 2.0, -0.5, -0.5], dtype=torch.float64)
    g = clipped_surrogate_grad(r, a, 0.25, 0.5, dual_clip=3.0)
    assert torch.equal(g, a)
    # just outside: clipped
    outside = clipped_surrogate_grad(
        r * torch.tensor([0.999, 1.001, 1.001, 1.001], dtype=torch.float64), a, 0.25, 0.5, dual_clip=3.0
    )
    assert torch.equal(outside, torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_dual_clip_leaves_positive_advantages_alone_also_inside_a_wide_trust_region():
    """eps_high = 2.5 puts 1 + eps_high above c = 3: a token with 0 < A < 1 and c < r < 1 + eps_high is inside the
    trust region and keeps its gradient A (dual-clip bounds only A < 0, as in verl / OpenRLHF)."""
    r = torch.tensor([3.2], dtype=torch.float64)
    for a in (0.5, 2.0):
        adv = torch.tensor([a], dtype=torch.float64)
        assert clipped_surrogate_grad(r, adv, 0.2, 2.5, dual_clip=3.0).item() == a
        assert clipped_surrogate(r, adv, 0.2, 2.5, dual_clip=3.0).item() == pytest.approx(3.2 * a)


def test_zero_advantage_contributes_nothing():
    r = torch.tensor([0.1, 1.0, 7.0])
    a = torch.zeros(3)
    assert torch.equal(cfpo_surrogate(r, a), torch.zeros(3))
    assert torch.equal(clipped_surrogate(r, a), torch.zeros(3))


def test_broadcasting_shapes():
    r = torch.ones(3, 5)
    a = torch.randn(3, 1)
    assert cfpo_surrogate(r, a).shape == (3, 5)
    assert clipped_surrogate(r, a).shape == (3, 5)
    assert math.isclose(cfpo_surrogate(r, a).sum().item(), (a.expand(3, 5)).sum().item(), rel_tol=1e-6)


# ---- the objective registry: one record per objective, consulted everywhere --------------------------


def test_unknown_objective_raises_everywhere():
    from cfpo_loss import compute_policy_loss, fused_linear_policy_loss, get_objective

    lp, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    # unhashable and non-string values too: the same ValueError, never a TypeError from the dict lookup
    for bad in ("spo", "CFPO", None, 3, 1.5, b"cfpo", ["cfpo"], {"cfpo": 1}, {"cfpo"}):
        with pytest.raises(ValueError, match="unknown objective"):
            get_objective(bad)
        with pytest.raises(ValueError, match="unknown objective"):
            compute_policy_loss(lp, lp, torch.ones(2), mask, objective=bad)
        with pytest.raises(ValueError, match="unknown objective"):
            fused_linear_policy_loss(
                torch.zeros(2, 3, 4),
                torch.zeros(5, 4),
                torch.zeros(2, 3, dtype=torch.long),
                lp,
                torch.ones(2),
                mask,
                objective=bad,
            )


def test_public_surrogates_are_the_records_terms():
    from cfpo_loss import OBJECTIVES

    r, a = torch.linspace(0.5, 1.5, 11, dtype=torch.float64), torch.linspace(-2, 2, 11, dtype=torch.float64)
    assert torch.equal(cfpo_surrogate(r, a, 0.2, 0.3), OBJECTIVES["cfpo"].terms(r, a, 0.2, 0.3).objective)
    assert torch.equal(clipped_surrogate(r, a, 0.2, 0.3, 3.0), OBJECTIVES["clip"].terms(r, a, 0.2, 0.3, 3.0).objective)
    assert OBJECTIVES["clip"].takes_dual_clip and not OBJECTIVES["cfpo"].takes_dual_clip
    assert OBJECTIVES["cfpo"].has_penalty and not OBJECTIVES["clip"].has_penalty


def test_a_third_objective_is_one_record(monkeypatch):
    """Registering a record is all it takes: the eager and compiled-free loss paths and the metrics use it.
    The plain policy-gradient surrogate J = r·A (no trust region) has dJ/dr = A, so dL/dlog π = −A·r / N."""
    from cfpo_loss import OBJECTIVES, Objective, compute_policy_loss
    from cfpo_loss.surrogates import Terms

    plain = Objective(
        "plain", lambda r, a, lo, hi, dc=None: Terms(r * a, a, None), takes_dual_clip=False, has_penalty=False
    )
    monkeypatch.setitem(OBJECTIVES, "plain", plain)
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    old = lp.detach() + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    out = compute_policy_loss(lp, old, adv, mask, objective="plain", dual_clip=3.0)
    r = (lp.detach() - old).exp()
    assert torch.allclose(out.loss, -(r * adv[:, None]).mean())
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert torch.allclose(grad, -(adv[:, None] * r) / 12)
    assert "penalty" not in out.metrics and "dual_clip_frac" not in out.metrics
