"""DiffusionGemma on ddiff's ops: uniform renoising, the denoising step and the full generate loop.

Oracles: transformers' own DiffusionGemma code (``LinearTemperatureScheduleLogitsProcessor``,
``EntropyBoundSampler``, ``StableAndConfidentStoppingCriteria``, ``generate``) on a tiny
random ``DiffusionGemmaForBlockDiffusion``; chi-square tests for the sampled tokens; Python
big-integer arithmetic for the renoising draw.
"""

import math

import pytest
import torch

import ddiff
from ddiff.reference.rng import STREAM_RENOISE, philox4x32

scipy_stats = pytest.importorskip("scipy.stats")

BACKENDS = ["torch", "triton"]


# ----------------------------------------------------------------------------------------
# renoise_uniform
# ----------------------------------------------------------------------------------------
def big_int_token(seed, offset, row, col, vocab):
    """The documented draw, with Python integers: floor((r0 * 2^32 + r1) * V / 2^64)."""
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    c3 = ((offset >> 32) & 0xFFFFFF) | (STREAM_RENOISE << 24)
    r0, r1, _, _ = philox4x32(t(col), t(row), t(offset & 0xFFFFFFFF), t(c3), t(k0), t(k1))
    x = (int(r0) << 32) | int(r1)
    return (x * vocab) >> 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_renoise_matches_the_documented_draw(backend):
    seed, offset, vocab = 2**40 + 12345, 2**33 + 7, 262144
    out = ddiff.renoise_uniform(torch.zeros(3, 9, dtype=torch.long), vocab_size=vocab, seed=seed, offset=offset,
                                backend=backend)
    for row, col in [(0, 0), (1, 4), (2, 8), (2, 1)]:
        assert int(out[row, col]) == big_int_token(seed, offset, row, col, vocab)
    odd = ddiff.renoise_uniform(torch.zeros(2, 5, dtype=torch.long), vocab_size=151936, seed=-3, backend=backend)
    assert int(odd[1, 3]) == big_int_token((-3) & (2**64 - 1), 0, 1, 3, 151936)


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 1500), (2, 3, 40)])
def test_renoise_backends_agree_and_keep_is_honoured(shape):
    g = torch.Generator().manual_seed(sum(shape))
    tokens = torch.randint(0, 50, shape, generator=g)
    keep = torch.rand(shape, generator=g) < 0.4
    rows = math.prod(shape[:-1])
    for seed in (7, torch.arange(rows) * 1000 + 1):
        outs = [ddiff.renoise_uniform(tokens, keep, vocab_size=1000, seed=seed, offset=3, backend=b) for b in BACKENDS]
        assert torch.equal(outs[0], outs[1])
        assert outs[0].shape == shape and outs[0].dtype == torch.int64
        assert torch.equal(outs[0][keep], tokens[keep])
        fresh = outs[0][~keep]
        assert ((fresh >= 0) & (fresh < 1000)).all()
    assert torch.equal(ddiff.renoise_uniform(tokens, None, vocab_size=1000, seed=7, offset=3),
                       ddiff.renoise_uniform(tokens, torch.zeros_like(keep), vocab_size=1000, seed=7, offset=3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_renoise_is_uniform(backend):
    vocab = 7
    x = ddiff.renoise_uniform(torch.zeros(64, 500, dtype=torch.long), vocab_size=vocab, seed=11, offset=5,
                              backend=backend)
    counts = torch.bincount(x.flatten(), minlength=vocab).double()
    assert scipy_stats.chisquare(counts.numpy()).pvalue > 1e-4
    # neighbouring positions and rows are independent: pairs (x[l], x[l+1]) are uniform over V^2
    pairs = torch.bincount((x[:, :-1] * vocab + x[:, 1:]).flatten(), minlength=vocab * vocab).double()
    assert scipy_stats.chisquare(pairs.numpy()).pvalue > 1e-4
    assert (ddiff.renoise_uniform(torch.zeros(2, 8, dtype=torch.long), vocab_size=1, seed=0, backend=backend) == 0).all()


def test_renoise_seeds_offsets_and_generators():
    z = torch.zeros(4, 64, dtype=torch.long)
    a = ddiff.renoise_uniform(z, vocab_size=10**6, seed=1, offset=0)
    assert torch.equal(a, ddiff.renoise_uniform(z, vocab_size=10**6, seed=1, offset=0))
    assert (a != ddiff.renoise_uniform(z, vocab_size=10**6, seed=1, offset=1)).float().mean() > 0.99
    assert (a != ddiff.renoise_uniform(z, vocab_size=10**6, seed=2, offset=0)).float().mean() > 0.99
    per_row = ddiff.renoise_uniform(z, vocab_size=10**6, seed=torch.tensor([5, 1, 5, 9]))
    # a row's draw depends on (seed, row, col), so row 1 with seed 1 equals row 1 of the seed-1 call
    assert torch.equal(per_row[1], a[1])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(ddiff.renoise_uniform(z, vocab_size=99, generator=g1),
                       ddiff.renoise_uniform(z, vocab_size=99, generator=g2))
    torch.manual_seed(0)
    b = ddiff.renoise_uniform(z, vocab_size=99)
    torch.manual_seed(0)
    assert torch.equal(b, ddiff.renoise_uniform(z, vocab_size=99))


@pytest.mark.parametrize("backend", BACKENDS)
def test_renoise_empty(backend):
    for shape in ((0, 5), (3, 0)):
        out = ddiff.renoise_uniform(torch.zeros(shape, dtype=torch.long), vocab_size=5, seed=0, backend=backend)
        assert out.shape == shape and out.dtype == torch.int64


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(tokens=torch.zeros(2, 3)), TypeError, "tokens"),
    (dict(tokens=torch.zeros(2, 3, dtype=torch.bool)), TypeError, "tokens"),
    (dict(tokens=torch.tensor(3)), ValueError, "tokens"),
    (dict(keep=torch.ones(2, 4, dtype=torch.bool)), ValueError, "keep"),
    (dict(keep=torch.ones(2, 3)), TypeError, "keep"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(vocab_size=2**31), ValueError, "vocab_size"),
    (dict(vocab_size=True), TypeError, "vocab_size"),
    (dict(vocab_size=3.0), TypeError, "vocab_size"),
    (dict(seed=torch.zeros(3, dtype=torch.long)), ValueError, "seed"),
    (dict(offset=-1), ValueError, "offset"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_renoise_bad_arguments(kwargs, err, match):
    args = dict(tokens=torch.zeros(2, 3, dtype=torch.long), keep=None, vocab_size=10, seed=0)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        ddiff.renoise_uniform(args.pop("tokens"), args.pop("keep"), **args)


def test_renoise_compiles_with_fullgraph():
    @torch.compile(fullgraph=True, backend="eager")
    def step(tokens, keep):
        return ddiff.renoise_uniform(tokens, keep, vocab_size=123, seed=4, offset=2, backend="torch")

    tokens = torch.randint(0, 123, (2, 30))
    keep = torch.rand(2, 30) < 0.5
    assert torch.equal(step(tokens, keep), ddiff.renoise_uniform(tokens, keep, vocab_size=123, seed=4, offset=2))
