"""select_transfer(entropy_bound=...): the entropy-bound sampler's acceptance rule (arXiv 2505.24857).

Three oracles: a per-row loop over Python floats written here, transformers'
``EntropyBoundSampler.accept_canvas`` (DiffusionGemma) itself, and the PyTorch reference,
against which the Triton kernel (interpreted on CPU) is checked.
"""

import math

import pytest
import torch

import ddiff
from ddiff.ops import select_transfer

dg = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")

BACKENDS = ["torch", "triton"]


def loop_oracle(conf, mask, bound):
    """Sort each row's candidates by (entropy asc, position asc) and walk: accept while the
    entropies already accepted sum to at most the bound (Python floats, i.e. float64)."""
    B, L = conf.shape
    out = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        bnd = float(torch.tensor(float(bound[b] if isinstance(bound, torch.Tensor) else bound), dtype=torch.float32))
        cand = []
        for i in range(L):
            if bool(mask[b, i]):
                v = float(conf[b, i].float())
                v = -math.inf if math.isnan(v) else v
                cand.append((max(-v, 0.0), i))
        cand.sort()
        spent = 0.0
        for cost, i in cand:
            if spent > bnd:
                break
            out[b, i] = True
            spent += cost
    return out


def transformers_accept(logits, bound):
    """The accepted positions of DiffusionGemma's own sampler for these (processed) logits."""
    B, L, V = logits.shape
    sampler = dg.EntropyBoundSampler(dg.EntropyBoundSamplerConfig(entropy_bound=bound), L, V, 1)
    canvas = torch.zeros(B, L, dtype=torch.long)
    sampler.accept_canvas(canvas, canvas + 1, logits, 1)
    return sampler.accepted_token_mask


def entropies(logits):
    return torch.distributions.Categorical(logits=logits).entropy()


# ----------------------------------------------------------------------------------------
# against transformers' EntropyBoundSampler
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bound,scale", [(0.1, 3.0), (0.5, 4.0), (2.0, 2.0), (1e-3, 6.0), (40.0, 1.0)])
def test_accepted_set_equals_transformers(backend, bound, scale):
    g = torch.Generator().manual_seed(int(bound * 1000) + int(scale))
    logits = torch.randn(3, 64, 48, generator=g) * scale
    want = transformers_accept(logits, bound)
    mask = torch.ones(3, 64, dtype=torch.bool)
    got = select_transfer(-entropies(logits), mask, entropy_bound=bound, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accepted_set_from_predict_tokens_equals_transformers(backend):
    """The DiffusionGemma step's pair: predict_tokens' neg_entropy, then the bound rule."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 16, 200, generator=g) * 2.5
    _, conf = ddiff.predict_tokens(logits, temperature=1.0, confidence="neg_entropy", confidence_from="sampling",
                                   seed=0, backend=backend)
    for bound in (0.1, 1.0, 4.0):
        got = select_transfer(conf, torch.ones(2, 16, dtype=torch.bool), entropy_bound=bound, backend=backend)
        assert torch.equal(got, transformers_accept(logits, bound)), bound


def test_tied_entropies_accept_as_many_as_transformers_lowest_positions_first():
    """Identical rows tie exactly; transformers' sort keeps an arbitrary part of the tie, ddiff
    the lowest positions, and both accept the same number."""
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, 1, 32, generator=g)
    logits = torch.cat([row.expand(1, 10, 32), torch.randn(1, 6, 32, generator=g) * 0.1], dim=1)
    ent = entropies(logits)
    bound = float(ent[0, 0]) * 3.5  # cuts through the tie of ten
    want = transformers_accept(logits, bound)
    for backend in BACKENDS:
        got = select_transfer(-ent, torch.ones_like(want), entropy_bound=bound, backend=backend)
        assert got.sum() == want.sum()
        assert torch.equal(got, loop_oracle(-ent, torch.ones_like(want), bound))


# ----------------------------------------------------------------------------------------
# kernel vs reference vs loop, awkward inputs
# ----------------------------------------------------------------------------------------
def _case(seed, B, L, dtype, *, zeros=False, ties=False, infs=False, nans=False, positive=False, mask_p=0.7):
    g = torch.Generator().manual_seed(seed)
    conf = -(torch.rand(B, L, generator=g) ** 2) * 3.0
    if zeros:
        conf[:, ::5] = 0.0
    if ties:
        conf[:, 1::3] = -0.25
    if infs:
        conf[:, 2::7] = -math.inf
    if nans:
        conf[:, 3::11] = math.nan
    if positive:
        conf[:, 4::6] = 0.5  # not an entropy: counts as cost 0
    mask = torch.rand(B, L, generator=g) < mask_p
    return conf.to(dtype), mask


CASES = [
    dict(seed=0, B=4, L=1, dtype=torch.float32),
    dict(seed=1, B=3, L=7, dtype=torch.float32, ties=True),
    dict(seed=2, B=5, L=256, dtype=torch.float32, zeros=True, infs=True),
    dict(seed=3, B=2, L=1000, dtype=torch.float32, ties=True, nans=True),
    dict(seed=4, B=3, L=33, dtype=torch.float16, ties=True, positive=True),
    dict(seed=5, B=3, L=129, dtype=torch.bfloat16, zeros=True, ties=True),
    dict(seed=6, B=2, L=64, dtype=torch.float32, mask_p=0.0),
    dict(seed=7, B=2, L=64, dtype=torch.float32, mask_p=1.0, infs=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c['L']}-{str(c['dtype'])[6:]}-s{c['seed']}")
@pytest.mark.parametrize("bound", [0.0, 0.3, 2.5, 1e9])
def test_kernel_reference_and_loop_agree(case, bound):
    conf, mask = _case(**case)
    want = loop_oracle(conf, mask, bound)
    ref = select_transfer(conf, mask, entropy_bound=bound, backend="torch")
    tri = select_transfer(conf, mask, entropy_bound=bound, backend="triton")
    assert torch.equal(ref, want)
    assert torch.equal(tri, want)
    assert not (tri & ~mask).any()
    has_cand = mask.any(dim=1)
    assert torch.equal(tri.any(dim=1), has_cand)  # the least uncertain candidate always passes


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_bound_tensor(backend):
    conf, mask = _case(11, 4, 50, torch.float32, ties=True)
    bound = torch.tensor([0.0, 0.2, 1.5, 100.0])
    got = select_transfer(conf, mask, entropy_bound=bound, backend=backend)
    assert torch.equal(got, loop_oracle(conf, mask, bound))
    zero_dim = select_transfer(conf, mask, entropy_bound=torch.tensor(1.5), backend=backend)
    assert torch.equal(zero_dim, select_transfer(conf, mask, entropy_bound=1.5, backend=backend))
    assert torch.equal(got[3], mask[3])  # a huge bound takes every candidate


@pytest.mark.parametrize("backend", BACKENDS)
def test_bound_boundary_is_inclusive(backend):
    # costs 0.25, 0.25, 0.5, ...: with bound 0.5 the third is accepted (0.25 + 0.25 <= 0.5), the fourth not
    conf = torch.tensor([[-0.5, -0.25, -1.0, -0.25, -2.0]])
    mask = torch.ones_like(conf, dtype=torch.bool)
    got = select_transfer(conf, mask, entropy_bound=0.5, backend=backend)
    assert got.tolist() == [[True, True, False, True, False]]
    got = select_transfer(conf, mask, entropy_bound=0.4999, backend=backend)
    assert got.tolist() == [[False, True, False, True, False]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_zero_length(backend):
    for shape in ((0, 8), (3, 0)):
        conf = torch.zeros(shape)
        out = select_transfer(conf, torch.zeros(shape, dtype=torch.bool), entropy_bound=0.1, backend=backend)
        assert out.shape == shape and out.dtype == torch.bool and not out.any()


def test_long_rows_fall_back_to_the_reference():
    from ddiff.kernels import selection as kernels

    L = kernels.MAX_L + 3
    conf, mask = _case(12, 1, L, torch.float32, ties=True)
    got = select_transfer(conf, mask, entropy_bound=3.0, backend="triton")
    assert torch.equal(got, select_transfer(conf, mask, entropy_bound=3.0, backend="torch"))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(entropy_bound=0.1, num_transfer=2), ValueError, "cannot be combined"),
    (dict(entropy_bound=0.1, threshold=0.5), ValueError, "cannot be combined"),
    (dict(entropy_bound=0.1, factor=1.0), ValueError, "cannot be combined"),
    (dict(entropy_bound=-0.1), ValueError, ">= 0"),
    (dict(entropy_bound=float("nan")), ValueError, ">= 0"),
    (dict(entropy_bound="0.1"), TypeError, "entropy_bound"),
    (dict(entropy_bound=torch.tensor([0.1, -1.0])), ValueError, "entropy_bound"),
    (dict(entropy_bound=torch.tensor([1, 2])), TypeError, "entropy_bound"),
    (dict(entropy_bound=torch.tensor([0.1, 0.2, 0.3])), ValueError, "entropy_bound"),
])
def test_bad_arguments(kwargs, err, match):
    conf = -torch.rand(2, 5)
    with pytest.raises(err, match=match):
        select_transfer(conf, torch.ones(2, 5, dtype=torch.bool), **kwargs)


def test_compiles_with_fullgraph():
    conf, mask = _case(13, 3, 40, torch.float32, ties=True)

    @torch.compile(fullgraph=True, backend="eager")
    def step(c, m):
        return select_transfer(c, m, entropy_bound=0.7, backend="torch")

    assert torch.equal(step(conf, mask), loop_oracle(conf, mask, 0.7))
