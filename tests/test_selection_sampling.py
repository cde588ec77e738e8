"""select_transfer(num_transfer=k, temperature=τ): k positions drawn without replacement from
softmax(confidence / τ) (Dream's ``alg_temp``), by Gumbel-top-k on ddiff's Philox stream 5."""

import itertools

import pytest
import torch

import ddiff
from ddiff.reference.rng import STREAM_SELECT, philox_gumbel
from ddiff.reference.selection import select_transfer_reference, selection_keys_reference

scipy_stats = pytest.importorskip("scipy.stats")


def without_replacement(weights, k):
    """Exact probability of each k-subset when k items are drawn one by one without replacement."""
    total = sum(weights)
    w = [v / total for v in weights]
    probs = {}
    for order in itertools.permutations(range(len(w)), k):
        p, left = 1.0, 1.0
        for i in order:
            p *= w[i] / left
            left -= w[i]
        key = tuple(sorted(order))
        probs[key] = probs.get(key, 0.0) + p
    return probs


@pytest.mark.parametrize("k", [1, 2])
def test_sampled_positions_follow_softmax_without_replacement(k):
    rows, tau = 4000, 0.7
    conf = torch.tensor([0.1, 0.9, -0.4, 0.5, 0.3])
    mask = torch.tensor([True, True, True, False, True])
    chosen = ddiff.select_transfer(conf.expand(rows, 5), mask.expand(rows, 5), num_transfer=k, temperature=tau,
                                   seed=11, backend="torch")
    assert chosen.sum(1).eq(k).all() and not chosen[:, 3].any()
    cand = [0, 1, 2, 4]
    want = without_replacement(torch.softmax(conf[cand].double() / tau, 0).tolist(), k)
    keys = sorted(want)
    seen = {key: 0 for key in keys}
    for row in chosen[:, cand].tolist():
        seen[tuple(i for i, v in enumerate(row) if v)] += 1
    observed = [seen[key] for key in keys]
    expected = [want[key] * rows for key in keys]
    assert scipy_stats.chisquare(observed, expected).pvalue > 1e-3


def test_keys_are_confidence_over_tau_plus_philox_gumbel():
    conf = torch.tensor([[0.2, float("-inf"), float("nan"), 0.7], [1.0, 0.5, 0.0, -1.0]])
    tau = torch.tensor([0.5, 0.0])
    keys = selection_keys_reference(conf, tau, torch.tensor([3, 3]), 7)
    g = philox_gumbel(torch.tensor(3), 7, torch.zeros(1, 4, dtype=torch.int64), torch.arange(4)[None], STREAM_SELECT)
    torch.testing.assert_close(keys[0, [0, 3]], conf[0, [0, 3]] / 0.5 + g[0, [0, 3]])
    assert keys[0, 1] == float("-inf") and keys[0, 2] == float("-inf")  # -inf and NaN never win
    torch.testing.assert_close(keys[1], conf[1])  # τ = 0: the plain top-k


def test_draws_repeat_per_seed_and_row_and_differ_by_offset():
    conf = torch.randn(6, 40)
    mask = torch.rand(6, 40) > 0.3
    a = ddiff.select_transfer(conf, mask, num_transfer=5, temperature=1.0, seed=4, offset=2, backend="torch")
    b = ddiff.select_transfer(conf, mask, num_transfer=5, temperature=1.0, seed=4, offset=2, backend="torch")
    c = ddiff.select_transfer(conf, mask, num_transfer=5, temperature=1.0, seed=4, offset=3, backend="torch")
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a row's draw does not depend on the other rows
    solo = ddiff.select_transfer(conf[:1], mask[:1], num_transfer=5, temperature=1.0, seed=4, offset=2,
                                 backend="torch")
    assert torch.equal(solo, a[:1])
    g1 = ddiff.select_transfer(conf, mask, num_transfer=5, temperature=1.0,
                               generator=torch.Generator().manual_seed(1), backend="torch")
    g2 = ddiff.select_transfer(conf, mask, num_transfer=5, temperature=1.0,
                               generator=torch.Generator().manual_seed(1), backend="torch")
    assert torch.equal(g1, g2)
    # the sampled rule is the top-k of the keys
    keys = selection_keys_reference(conf, torch.ones(6), torch.full((6,), 4), 2)
    assert torch.equal(a, select_transfer_reference(keys, mask, num_transfer=5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_and_triton_draw_the_same_positions(dtype, device):
    conf = torch.randn(5, 37, device=device).to(dtype)
    mask = torch.rand(5, 37, device=device) > 0.4
    tau = torch.tensor([0.5, 1.0, 0.0, 2.0, 0.25], device=device)
    k = torch.tensor([1, 3, 4, 0, 37], device=device)
    outs = [ddiff.select_transfer(conf, mask, num_transfer=k, temperature=tau, seed=torch.arange(5, device=device),
                                  offset=9, backend=b) for b in ("torch", "triton")]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0].sum(1), torch.minimum(k, mask.sum(1)))


def test_zero_temperature_is_the_deterministic_top_k():
    conf, mask = torch.randn(3, 9), torch.ones(3, 9, dtype=torch.bool)
    assert torch.equal(ddiff.select_transfer(conf, mask, num_transfer=4, temperature=0.0, backend="torch"),
                       ddiff.select_transfer(conf, mask, num_transfer=4, backend="torch"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=1.0, threshold=0.5), "num_transfer"),
    (dict(temperature=1.0), "num_transfer"),
    (dict(num_transfer=1, temperature=-1.0), "temperature"),
    (dict(num_transfer=1, temperature=1.0, factor=1.0), "factor"),
    (dict(num_transfer=1, temperature=1.0, seed=1, generator=torch.Generator()), "not both"),
    (dict(num_transfer=1, temperature=torch.ones(3)), "temperature"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ddiff.select_transfer(torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool), backend="torch", **kwargs)
