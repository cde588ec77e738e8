"""sample: distribution, determinism, backend agreement, noise tail, bad inputs, compile."""

import math

import pytest
import torch

import triton
import triton.language as tl

import ddiff
from conftest import DEVICE
from ddiff.kernels import rng as krng
from ddiff.reference import rng as ref_rng
from ddiff.reference.sampling import keep_mask

scipy_stats = pytest.importorskip("scipy.stats")

BACKENDS = ["torch", "triton"]


def filtered_probs(logits_row, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """softmax(filter(logits / T)) for one row, from the reference filter."""
    row = logits_row[None].float()
    keep, z = keep_mask(row, torch.tensor([temperature]), torch.tensor([top_k]),
                        torch.tensor([top_p]), torch.tensor([min_p]))
    return torch.softmax(z.masked_fill(~keep, float("-inf")), -1)[0]


def chi_square_pvalue(tokens, probs):
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    probs = probs.double() / probs.double().sum()
    expected = probs * tokens.numel()
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token of probability 0"
    return scipy_stats.chisquare(counts[support].numpy(), expected[support].numpy()).pvalue


CHI_SQUARE_CASES = [dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.8),
                    dict(min_p=0.15), dict(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05)]


@pytest.mark.parametrize(
    "backend,kwargs",
    [("torch", kw) for kw in CHI_SQUARE_CASES] + [("triton", CHI_SQUARE_CASES[0]), ("triton", CHI_SQUARE_CASES[-1])],
)
def test_chi_square_against_filtered_softmax(backend, kwargs):
    # The interpreter runs one program at a time, so the triton backend gets fewer draws; its
    # noise is the torch backend's (test_same_seed_same_tokens_across_backends), so the torch
    # cases carry the statistical power.
    n = 6000 if backend == "torch" else 150
    logits_row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.1, 0.7, -3.0])
    logits = logits_row.expand(n, -1).to(DEVICE)
    tokens = ddiff.sample(logits, seed=2024, backend=backend, **kwargs)
    probs = filtered_probs(logits_row, kwargs.get("temperature", 1.0), kwargs.get("top_k", 0),
                           kwargs.get("top_p", 1.0), kwargs.get("min_p", 0.0))
    assert chi_square_pvalue(tokens, probs) > 1e-4


@pytest.mark.parametrize("backend,n", [("torch", 6000), ("triton", 150)])
def test_bd3lm_nucleus_sampling_follows_bd3lm(backend, n):
    # BD3LM: p_x0 -> sort, keep cumsum <= p (and the top one), renormalise, sample; here on the
    # tempered distribution (BD3LM itself has no temperature: T = 1 is its exact rule).
    logits_row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.1, 0.7, -3.0])
    for temperature in (1.0, 0.8):
        probs = torch.softmax(logits_row.double() / temperature, -1)
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) <= 0.8
        keep[0] = True
        expected = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
        tokens = ddiff.sample(logits_row.expand(n, -1).to(DEVICE), temperature=temperature, top_p=0.8,
                              top_p_mode="bd3lm", seed=7, backend=backend)
        assert chi_square_pvalue(tokens, expected) > 1e-4
    with pytest.raises(ValueError, match="top_p_mode"):
        ddiff.sample(logits_row[None].to(DEVICE), top_p=0.5, top_p_mode=None, backend=backend)


def test_chi_square_spans_several_noise_tiles():
    # V > NOISE_TILE: the tile race must weigh tiles by their mass.
    vocab = 2 * ref_rng.NOISE_TILE + 37
    logits_row = torch.full((vocab,), -30.0)
    hot = torch.tensor([3, 1500, 1024, 2060, 2080])
    logits_row[hot] = torch.tensor([0.0, 1.0, -0.5, 0.5, 0.2])
    logits = logits_row.expand(4000, -1).to(DEVICE)
    tokens = ddiff.sample(logits, seed=5, backend="torch")
    assert chi_square_pvalue(tokens, torch.softmax(logits_row, -1)) > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_zero_is_argmax(backend):
    logits = torch.randn(5, 3, 70, device=DEVICE)
    logits[0, 0, 10] = logits[0, 0, 20] = 100.0  # tie: the first index wins
    tokens = ddiff.sample(logits, temperature=0.0, backend=backend)
    assert torch.equal(tokens, logits.argmax(-1))
    assert tokens[0, 0] == 10
    # Filters never remove the argmax, so greedy ignores them.
    assert torch.equal(ddiff.sample(logits, temperature=0.0, top_k=3, top_p=0.5, backend=backend), logits.argmax(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_temperature_with_zeros(backend):
    logits = torch.randn(6, 40, device=DEVICE)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.5, 2.0, 0.0], device=DEVICE)
    tokens, probs = ddiff.sample(logits, temperature=temperature, seed=3, return_probs=True, backend=backend)
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])
    # Greedy rows report the probability under the softmax at temperature 1.
    assert torch.allclose(probs[greedy], torch.softmax(logits, -1).max(-1).values[greedy], atol=1e-6)
    hot = ~greedy
    expected = torch.softmax(logits[hot] / temperature[hot, None], -1).gather(-1, tokens[hot, None]).squeeze(-1)
    assert torch.allclose(probs[hot], expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 5, 1025, 3000])
@pytest.mark.parametrize("filtered", [False, True])
def test_same_seed_same_tokens_across_backends(dtype, vocab, filtered):
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(2, 4, vocab, generator=gen) * 2).to(dtype).to(DEVICE)
    kwargs = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02) if filtered else dict(temperature=0.8)
    for top_p_mode in ("inclusive", "bd3lm") if filtered else ("inclusive",):
        ref_tokens, ref_probs = ddiff.sample(logits, seed=11, offset=4, return_probs=True, backend="torch",
                                             top_p_mode=top_p_mode, **kwargs)
        tri_tokens, tri_probs = ddiff.sample(logits, seed=11, offset=4, return_probs=True, backend="triton",
                                             top_p_mode=top_p_mode, **kwargs)
        # Only float near-ties may differ: at most one of the 8 rows here, and none on average.
        assert (ref_tokens != tri_tokens).sum() <= 1
        same = ref_tokens == tri_tokens
        assert torch.allclose(ref_probs[same], tri_probs[same], rtol=1e-5, atol=1e-7)


def test_backends_agree_on_many_rows():
    gen = torch.Generator().manual_seed(99)
    logits = (torch.randn(40, 300, generator=gen) * 2).to(DEVICE)
    for kwargs in [dict(), dict(top_k=30, top_p=0.85)]:
        a = ddiff.sample(logits, seed=123, backend="torch", **kwargs)
        b = ddiff.sample(logits, seed=123, backend="triton", **kwargs)
        assert (a != b).sum() <= 1, kwargs


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_and_offset_determinism(backend):
    logits = torch.randn(16, 50, device=DEVICE)
    a = ddiff.sample(logits, seed=7, backend=backend)
    assert torch.equal(a, ddiff.sample(logits, seed=7, backend=backend))
    b = ddiff.sample(logits, seed=7, offset=1, backend=backend)
    c = ddiff.sample(logits, seed=8, backend=backend)
    assert (a != b).sum() > 6 and (a != c).sum() > 6
    torch.manual_seed(0)
    d = ddiff.sample(logits, backend=backend)
    torch.manual_seed(0)
    assert torch.equal(d, ddiff.sample(logits, backend=backend))
    g1, g2 = torch.Generator(DEVICE).manual_seed(5), torch.Generator(DEVICE).manual_seed(5)
    assert torch.equal(ddiff.sample(logits, generator=g1, backend=backend), ddiff.sample(logits, generator=g2, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_seeds_are_honoured(backend):
    logits = torch.randn(8, 64, device=DEVICE).expand(8, 64).contiguous()
    seeds = torch.arange(100, 108, device=DEVICE)
    a = ddiff.sample(logits, seed=seeds, backend=backend)
    seeds2 = seeds.clone()
    seeds2[3] = 999
    b = ddiff.sample(logits, seed=seeds2, backend=backend)
    assert torch.equal(a[torch.arange(8) != 3], b[torch.arange(8) != 3])
    # Row r with seed s draws what row r of an all-s batch draws.
    for r in (0, 5):
        full = ddiff.sample(logits, seed=int(seeds[r]), backend=backend)
        assert a[r] == full[r]
    # Over many seeds row 3's token varies.
    draws = {int(ddiff.sample(logits[:4], seed=torch.full((4,), s, device=DEVICE), backend=backend)[3]) for s in range(8)}
    assert len(draws) > 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_independent_of_the_rest_of_the_batch(backend):
    logits = torch.randn(10, 2100, device=DEVICE)
    a = ddiff.sample(logits, seed=1, top_k=100, backend=backend)
    other = logits.clone()
    other[[0, 1, 2, 7, 8, 9]] = torch.randn(6, 2100, device=DEVICE)
    b = ddiff.sample(other, seed=1, top_k=100, backend=backend)
    assert torch.equal(a[3:7], b[3:7])


def test_split_rows_give_the_same_tokens():
    from ddiff.kernels import sampling as kernels

    logits = torch.randn(3, 5 * ref_rng.NOISE_TILE + 11, device=DEVICE)
    seed = torch.tensor([42], device=DEVICE)
    # target_items sets how many (row, run of tiles) programs the streaming pass uses: 1 to 6 runs per row.
    results = [kernels.sample_fwd(logits, None, 0.9, None, 0, None, 1.0, None, 0.0, seed, 0, 3, filtered=False,
                                  target_items=items) for items in (1, 6, 9, 18)]
    for tokens, probs in results[1:]:
        assert torch.equal(tokens, results[0][0])
        assert torch.allclose(probs, results[0][1], rtol=1e-6)


def test_filtered_split_rows_give_the_same_tokens():
    from ddiff.kernels import sampling as kernels

    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 5 * kernels.FILTER_BLOCK + 11, generator=gen) * 2).to(DEVICE)
    seed = torch.tensor([42], device=DEVICE)
    # target_items sets how many (row, run of blocks) programs the two passes use: 1 to 6 runs per row.
    for filters in [(None, 50, None, 0.9, None, 0.0), (None, 0, None, 1.0, None, 0.2)]:
        results = [kernels.sample_fwd(logits, None, 0.9, *filters, seed, 0, 3, filtered=True, target_items=items)
                   for items in (1, 6, 9, 18)]
        ref_tokens, ref_probs = ddiff.sample(logits, 0.9, top_k=filters[1], top_p=filters[3], min_p=filters[5], seed=42,
                                             offset=3, return_probs=True, backend="torch")
        for tokens, probs in results:
            assert torch.equal(tokens, ref_tokens), filters
            assert torch.allclose(probs, ref_probs, rtol=1e-5), filters


@pytest.mark.parametrize("vocab", [50257, 126464, 151936])
def test_real_vocab_sizes(vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(1, vocab, generator=gen) * 3).to(torch.bfloat16).to(DEVICE)
    cases = [dict(temperature=0.7)] + ([dict(temperature=1.0, top_k=50, top_p=0.9)] if vocab == 151936 else [])
    for kwargs in cases:
        a, pa = ddiff.sample(logits, seed=vocab, return_probs=True, backend="torch", **kwargs)
        b, pb = ddiff.sample(logits, seed=vocab, return_probs=True, backend="triton", **kwargs)
        assert torch.equal(a, b), kwargs
        assert torch.allclose(pa, pb, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_shapes(backend):
    assert ddiff.sample(torch.randn(0, 10, device=DEVICE), backend=backend).shape == (0,)
    tokens, probs = ddiff.sample(torch.randn(2, 0, 5, device=DEVICE), return_probs=True, backend=backend)
    assert tokens.shape == (2, 0) and probs.shape == (2, 0)
    assert ddiff.sample(torch.randn(7, device=DEVICE), seed=0, backend=backend).shape == ()
    one = ddiff.sample(torch.randn(3, 1, device=DEVICE), seed=0, backend=backend)
    assert torch.equal(one, torch.zeros(3, dtype=torch.long, device=DEVICE))
    base = torch.randn(30, 4, device=DEVICE)
    assert torch.equal(ddiff.sample(base.t(), seed=1, backend=backend), ddiff.sample(base.t().contiguous(), seed=1, backend=backend))


# ---------------------------------------------------------------------------------------------
# The noise: identical integers on both backends, and a tail that is not cut at 2^-24.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _uniform_probe(out_ptr, seed, offset, n_cols, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    k0, k1 = krng.rng_key(seed)
    c2, c3 = krng.rng_counter_hi(offset, STREAM)
    cols = tl.arange(0, BLOCK)
    u = krng.philox_uniform(k0, k1, c2, c3, row, cols)
    tl.store(out_ptr + row * n_cols + cols, u, mask=cols < n_cols)


@triton.jit
def _convert_bits(r0_ptr, r1_ptr, u_ptr, g_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    r0 = tl.load(r0_ptr + i).to(tl.uint32)
    r1 = tl.load(r1_ptr + i).to(tl.uint32)
    u = krng.uniform_from_bits(r0, r1)
    tl.store(u_ptr + i, u)
    tl.store(g_ptr + i, -tl.log(krng.exponential_from_uniform(u)))


def _triton_uniforms(seed, offset, rows, cols, stream):
    out = torch.empty(rows, cols, device=DEVICE)
    _uniform_probe[(rows,)](out, seed, offset, cols, STREAM=stream, BLOCK=triton.next_power_of_2(cols))
    return out


@pytest.mark.parametrize("seed,offset", [(0, 0), (123456789, 5), (2**40 + 3, 2**33 + 1), (-5, 17)])
def test_philox_uniforms_are_bit_identical(seed, offset):
    rows, cols = 3, 100
    tri = _triton_uniforms(seed, offset, rows, cols, ref_rng.STREAM_TOKEN)
    ref = ref_rng.philox_uniform(torch.tensor(seed, device=DEVICE), offset, torch.arange(rows, device=DEVICE)[:, None],
                                 torch.arange(cols, device=DEVICE)[None, :], ref_rng.STREAM_TOKEN)
    assert torch.equal(tri, ref)
    assert bool((ref > 0).all() and (ref < 1).all())


def test_philox_matches_the_random123_known_answer():
    # Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    m = 0xFFFFFFFF
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    out = ref_rng.philox4x32(t(0), t(0), t(0), t(0), t(0), t(0))
    assert [int(o) for o in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    out = ref_rng.philox4x32(t(m), t(m), t(m), t(m), t(m), t(m))
    assert [int(o) for o in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_smallest_uniform_is_below_2_pow_minus_50():
    zero = torch.zeros(1, dtype=torch.int64)
    u_min = ref_rng.uniform_from_bits(zero, zero)
    assert u_min.item() <= 2.0**-50 and u_min.item() > 0
    ones = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    assert ref_rng.uniform_from_bits(ones, ones).item() <= 1.0
    # The Gumbel variable built from it reaches ~36, far past the 16.6 of 24-bit uniforms.
    g_max = -torch.log(ref_rng.exponential_from_uniform(u_min))
    assert g_max.item() > 35.0
    # Resolution below 2^-24 is real: consecutive low words give distinct uniforms.
    lo = torch.arange(0, 1 << 12, dtype=torch.int64) << 8
    u = ref_rng.uniform_from_bits(torch.zeros_like(lo), lo)
    assert torch.unique(u).numel() == lo.numel() and u.max().item() < 2.0**-24


def test_triton_uniform_construction_matches_and_reaches_the_tail():
    r0 = torch.tensor([0, 0, 255, 256, 0xFFFFFFFF, 0x80000000, 12345678, 0], dtype=torch.int64, device=DEVICE)
    r1 = torch.tensor([0, 256, 0, 0, 0xFFFFFFFF, 0, 87654321, 0xFFFFFFFF], dtype=torch.int64, device=DEVICE)
    u = torch.empty(8, device=DEVICE)
    g = torch.empty(8, device=DEVICE)
    _convert_bits[(1,)](r0.to(torch.int32), r1.to(torch.int32), u, g, N=8)
    assert torch.equal(u, ref_rng.uniform_from_bits(r0, r1))
    assert u[0].item() <= 2.0**-50
    assert torch.allclose(g, -torch.log(ref_rng.exponential_from_uniform(u)), rtol=1e-6)
    assert g[0].item() > 35.0


def test_gumbel_noise_distribution():
    g = ref_rng.philox_gumbel(torch.tensor(3), 0, torch.arange(200)[:, None], torch.arange(500)[None, :], 0).flatten()
    assert abs(g.mean().item() - 0.5772) < 0.02
    assert abs(g.var().item() - math.pi**2 / 6) < 0.05
    assert scipy_stats.kstest(g.numpy(), "gumbel_r").pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(temperature=-0.1), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=torch.tensor([1.0, -1.0])), ValueError, "temperature"),
        (dict(temperature=torch.tensor([1.0, float("nan")])), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_p=torch.tensor([0.5, 0.0])), ValueError, "top_p"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=torch.tensor([3, -2])), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k"),
        (dict(min_p=-0.1), ValueError, "min_p"),
        (dict(min_p=1.1), ValueError, "min_p"),
        (dict(min_p=torch.tensor([0.1, 2.0])), ValueError, "min_p"),
        (dict(temperature=torch.ones(3)), ValueError, "temperature"),
        (dict(top_p=torch.full((5,), 0.5)), ValueError, "top_p"),
        (dict(seed=torch.arange(3)), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=torch.tensor([0.5, 1.0])), TypeError, "seed"),
        (dict(offset=-1), ValueError, "offset"),
        (dict(offset=2**60), ValueError, "offset"),
        (dict(seed=1, generator=torch.Generator()), ValueError, "generator"),
        (dict(temperature="hot"), TypeError, "temperature"),
    ],
)
def test_bad_parameters(backend, kwargs, exc, match):
    logits = torch.randn(2, 10, device=DEVICE)
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(exc, match=match):
        ddiff.sample(logits, backend=backend, **kwargs)


@pytest.mark.skipif(DEVICE != "cpu", reason="needs a second device to mismatch")
def test_per_row_tensor_on_wrong_device():
    logits = torch.randn(2, 10, device="meta")
    with pytest.raises(ValueError, match="top_k"):
        ddiff.sample(logits, top_k=torch.tensor([1, 2]), backend="torch")
    with pytest.raises(ValueError, match="seed"):
        ddiff.sample(logits, seed=torch.tensor([1, 2]), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_logits(backend):
    with pytest.raises(TypeError, match="logits"):
        ddiff.sample(torch.ones(2, 5, dtype=torch.int64, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="logits"):
        ddiff.sample([[1.0, 2.0]], backend=backend)
    with pytest.raises(TypeError, match="logits"):
        ddiff.filter_logits(torch.ones(2, 5, dtype=torch.int32, device=DEVICE), top_k=1, backend=backend)
    with pytest.raises(ValueError, match="logits"):
        ddiff.sample(torch.tensor(1.0, device=DEVICE), backend=backend)
    for bad_value in (float("nan"), float("inf")):
        logits = torch.randn(3, 2000, device=DEVICE)
        logits[1, 1500] = bad_value
        with pytest.raises(ValueError, match="row 1"):
            ddiff.sample(logits, seed=0, backend=backend)
        with pytest.raises(ValueError, match="row 1"):
            ddiff.sample(logits, seed=0, top_k=5, top_p=0.5, backend=backend)
        with pytest.raises(ValueError, match="row 1"):
            ddiff.filter_logits(logits, top_k=5, backend=backend)
    logits = torch.randn(3, 40, device=DEVICE)
    logits[2] = float("-inf")
    with pytest.raises(ValueError, match="row 2"):
        ddiff.sample(logits, seed=0, backend=backend)
    with pytest.raises(ValueError, match="row 2"):
        ddiff.sample(logits, seed=0, top_p=0.9, backend=backend)
    with pytest.raises(ValueError, match="row 2"):
        ddiff.filter_logits(logits, top_p=0.9, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        ddiff.sample(torch.randn(2, 3, device=DEVICE), backend="cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ddiff.sample(torch.randn(2, 3), backend="triton")


def test_auto_backend_on_cpu_is_torch():
    logits = torch.randn(4, 30)
    assert torch.equal(ddiff.sample(logits, seed=1), ddiff.sample(logits, seed=1, backend="torch"))


def test_torch_compile_fullgraph():
    def step(logits, temperature):
        filtered = ddiff.filter_logits(logits, top_k=5, backend="torch")
        tokens, probs = ddiff.sample(filtered, temperature=temperature, top_p=0.9, seed=3, return_probs=True,
                                     backend="torch")
        return tokens, probs

    compiled = torch.compile(step, fullgraph=True, backend="eager" if DEVICE == "cpu" else "inductor")
    logits = torch.randn(4, 100)
    temperature = torch.tensor([0.5, 1.0, 0.0, 2.0])
    tokens, probs = compiled(logits, temperature)
    eager_tokens, eager_probs = step(logits, temperature)
    assert torch.equal(tokens, eager_tokens) and torch.allclose(probs, eager_probs)


def test_torch_compile_fullgraph_inductor_cpu():
    def step(logits):
        return ddiff.sample(logits * 2.0, temperature=0.7, top_k=10, seed=1, backend="torch") + 1

    compiled = torch.compile(step, fullgraph=True)
    logits = torch.randn(3, 64)
    assert torch.equal(compiled(logits), step(logits))


@pytest.mark.cuda
def test_torch_compile_fullgraph_triton_cuda():
    def step(logits):
        return ddiff.sample(logits * 2.0, temperature=0.7, top_k=10, top_p=0.9, seed=1, backend="triton")

    compiled = torch.compile(step, fullgraph=True)
    logits = torch.randn(8, 5000, device="cuda")
    assert torch.equal(compiled(logits), step(logits))


# ---------------------------------------------------------------------------------------------
# Which kernel serves a filtered row: the candidate list, or the general multi-pivot kernel
# ---------------------------------------------------------------------------------------------


def _spy_on(monkeypatch, kernels, name, arg_index):
    """Record argument ``arg_index`` of every launch of kernels.<name> (the rows it serves)."""
    seen = []
    real = getattr(kernels, name)

    class Spy:
        def __getitem__(self, grid):
            launch = real[grid]

            def run(*args, **kwargs):
                seen.append(args[arg_index].clone())
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(kernels, name, Spy())
    return seen


def test_filtered_rows_use_the_candidate_list_unless_it_overflows(monkeypatch):
    from ddiff.kernels import sampling as kernels

    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(4, 3000, generator=gen) * 2).to(DEVICE)
    logits[1] = 0.0  # a flat row: every token ties at the top-k boundary
    logits[2, :700] = 20.0  # more ties at the top than the candidate list holds
    logits[3, 5] = float("-inf")
    served = _spy_on(monkeypatch, kernels, "_row_kernel", 4)
    for kwargs in [dict(top_k=50, top_p=0.9), dict(top_k=3, min_p=0.1, top_p_mode="bd3lm", top_p=0.5)]:
        tokens, probs = ddiff.sample(logits, temperature=0.9, seed=1, return_probs=True, backend="triton", **kwargs)
        assert served[-1].tolist() == [0, 1, 1, 0], kwargs
        ref_tokens, ref_probs = ddiff.sample(logits, temperature=0.9, seed=1, return_probs=True, backend="torch",
                                             **kwargs)
        assert torch.equal(tokens, ref_tokens)
        assert torch.allclose(probs, ref_probs, rtol=1e-5)
    # top-p alone gives no lower bound for the candidates: the general kernel serves every row.
    ddiff.sample(logits[:1], top_p=0.5, seed=1, backend="triton")
    assert served[-1].tolist() == [1]
    filtered_by = _spy_on(monkeypatch, kernels, "_filter_logits_kernel", 5)
    out = ddiff.filter_logits(logits, top_k=50, top_p=0.9, backend="triton")
    assert filtered_by[-1].tolist() == [0, 1, 1, 0]
    assert torch.equal(out, ddiff.filter_logits(logits, top_k=50, top_p=0.9, backend="torch"))
