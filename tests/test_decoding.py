"""predict_tokens, mdlm_step and udlm_step against their references and published loops."""

import pytest
import torch

import ddiff
from conftest import DEVICE
from ddiff.reference import rng as ref_rng

scipy_stats = pytest.importorskip("scipy.stats")

BACKENDS = ["torch", "triton"]
KINDS = ["prob", "margin", "neg_entropy", "random"]


def _logits(b, l, v, dtype=torch.float32, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, l, v, generator=gen) * scale).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# predict_tokens
# ---------------------------------------------------------------------------------------------


def independent_confidence(logits, tokens, kind, temperature=1.0):
    """Confidence straight from the definitions, in float64 (no filters)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    if kind == "prob":
        return probs.gather(-1, tokens[..., None]).squeeze(-1)
    if kind == "margin":
        top = probs.topk(2, -1).values
        return top[..., 0] - top[..., 1]
    return (probs * torch.log(probs.clamp_min(1e-300))).sum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["prob", "margin", "neg_entropy"])
@pytest.mark.parametrize("confidence_from", ["raw", "sampling"])
def test_confidence_definitions(backend, kind, confidence_from):
    logits = _logits(2, 6, 40, seed=1)
    temperature = 0.7
    tokens, conf = ddiff.predict_tokens(logits, temperature=temperature, confidence=kind,
                                        confidence_from=confidence_from, seed=3, backend=backend)
    expected = independent_confidence(logits, tokens, kind, 1.0 if confidence_from == "raw" else temperature)
    assert torch.allclose(conf.double(), expected, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_sampling_confidence_is_filtered_softmax_at_t1(backend):
    logits = _logits(1, 5, 30, seed=2)
    tokens, conf = ddiff.predict_tokens(logits, temperature=0.0, top_k=4, confidence="prob",
                                        confidence_from="sampling", backend=backend)
    assert torch.equal(tokens, logits.argmax(-1))
    filtered = ddiff.filter_logits(logits, top_k=4, backend="torch")
    assert torch.allclose(conf, torch.softmax(filtered, -1).max(-1).values, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("confidence_from", ["raw", "sampling"])
@pytest.mark.parametrize("filters", [{}, dict(top_k=8, top_p=0.9, min_p=0.02)])
def test_triton_equals_reference(dtype, kind, confidence_from, filters):
    logits = _logits(2, 5, 70, dtype=dtype, seed=4)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]], device=DEVICE)
    temperature = torch.tensor([0.0, 0.5, 1.0, 1.5, 0.0, 0.8, 1.0, 0.0, 2.0, 0.3], device=DEVICE)
    kwargs = dict(mask=mask, temperature=temperature, confidence=kind, confidence_from=confidence_from,
                  suppress_tokens=[0, 69], seed=9, offset=2, **filters)
    ref_tokens, ref_conf = ddiff.predict_tokens(logits, backend="torch", **kwargs)
    tri_tokens, tri_conf = ddiff.predict_tokens(logits, backend="triton", **kwargs)
    assert torch.equal(ref_tokens, tri_tokens)
    assert torch.allclose(ref_conf, tri_conf, rtol=1e-5, atol=1e-6)
    assert bool((tri_tokens[~mask] == -1).all()) and bool((tri_conf[~mask] == float("-inf")).all())
    assert not bool(((tri_tokens[mask] == 0) | (tri_tokens[mask] == 69)).any())


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_follow_sample_on_flattened_logits(backend):
    logits = _logits(3, 4, 300, seed=5)
    for kwargs in [dict(temperature=0.9), dict(temperature=1.1, top_k=20, top_p=0.8)]:
        tokens, _ = ddiff.predict_tokens(logits, seed=17, offset=3, backend=backend, **kwargs)
        flat = ddiff.sample(logits.flatten(0, -2), seed=17, offset=3, backend=backend, **kwargs)
        assert torch.equal(tokens.flatten(), flat)
        # The confidence kind never changes the tokens: "random" has its own noise stream.
        random_tokens, conf = ddiff.predict_tokens(logits, seed=17, offset=3, confidence="random", backend=backend,
                                                   **kwargs)
        assert torch.equal(random_tokens, tokens)
        assert bool(((conf > 0) & (conf <= 1)).all())


def test_random_confidence_is_uniform():
    logits = _logits(50, 40, 3, seed=6)
    _, conf = ddiff.predict_tokens(logits, confidence="random", seed=1, backend="torch")
    assert scipy_stats.kstest(conf.flatten().cpu().numpy(), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_none_empty_and_length_one(backend):
    logits = _logits(2, 1, 11, seed=7)
    tokens, conf = ddiff.predict_tokens(logits, backend=backend)
    assert tokens.shape == (2, 1) and torch.equal(tokens, logits.argmax(-1))
    tokens, conf = ddiff.predict_tokens(torch.randn(0, 4, 9, device=DEVICE), backend=backend)
    assert tokens.shape == (0, 4) and conf.shape == (0, 4)
    none_masked = torch.zeros(2, 1, dtype=torch.bool, device=DEVICE)
    tokens, conf = ddiff.predict_tokens(logits, none_masked, backend=backend)
    assert bool((tokens == -1).all()) and bool((conf == float("-inf")).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_tokens_bad_inputs(backend):
    logits = _logits(2, 3, 10)
    with pytest.raises(ValueError, match="mask"):
        ddiff.predict_tokens(logits, torch.ones(2, 4, dtype=torch.bool, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="mask"):
        ddiff.predict_tokens(logits, torch.ones(2, 3, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="confidence"):
        ddiff.predict_tokens(logits, confidence="entropy", backend=backend)
    with pytest.raises(ValueError, match="confidence_from"):
        ddiff.predict_tokens(logits, confidence_from="tempered", backend=backend)
    with pytest.raises(ValueError, match="suppress_tokens"):
        ddiff.predict_tokens(logits, suppress_tokens=[10], backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        ddiff.predict_tokens(logits, temperature=-1.0, backend=backend)
    bad = logits.clone()
    bad[1, 2, 4] = float("nan")
    with pytest.raises(ValueError, match="at batch 1, position 2 "):
        ddiff.predict_tokens(bad, backend=backend)
    # A NaN at a position that is not predicted is never read.
    mask = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    mask[1, 2] = False
    ddiff.predict_tokens(bad, mask, backend=backend)
    all_suppressed = _logits(1, 1, 2)
    with pytest.raises(ValueError, match="at batch 0, position 0 "):
        ddiff.predict_tokens(all_suppressed, suppress_tokens=[0, 1], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 70, 2 * 1024 + 5])
def test_return_argmax(backend, vocab):
    logits = _logits(2, 3, vocab, seed=21)
    if vocab > 3:
        logits[0, 0, :] = 0.0
        logits[0, 0, [1, 3]] = 9.0  # tie: the first index wins
        logits[1, 2, 1] = 50.0  # the largest logit is suppressed: the argmax skips it
    mask = torch.tensor([[True, True, False], [True, False, True]], device=DEVICE)
    suppress = [1] if vocab > 3 else None
    tokens, conf, argmax = ddiff.predict_tokens(logits, mask, temperature=0.8, top_k=5, suppress_tokens=suppress,
                                                return_argmax=True, seed=2, backend=backend)
    expected = ddiff.predict_tokens(logits, mask, temperature=0.8, top_k=5, suppress_tokens=suppress, seed=2,
                                    backend=backend)
    assert torch.equal(tokens, expected[0]) and torch.equal(conf, expected[1])
    suppressed = logits.clone()
    if suppress:
        suppressed[..., 1] = float("-inf")
    assert torch.equal(argmax[mask], suppressed.argmax(-1)[mask])
    assert bool((argmax[~mask] == -1).all())
    if vocab > 3:
        assert argmax[0, 0] == 3
    # Non-contiguous logits and the unfiltered path.
    base = _logits(vocab, 2, 3, seed=22).permute(1, 2, 0)
    _, _, argmax = ddiff.predict_tokens(base, temperature=1.0, return_argmax=True, seed=0, backend=backend)
    assert torch.equal(argmax, base.argmax(-1))


def gemma_step_reference(logits, temperature):
    """DiffusionGemma's `_denoising_step` quantities (transformers generation_diffusion_gemma.py):
    processed = logits / T, probs = softmax(processed) in fp32, argmax(processed), and the
    entropy of Categorical(logits=processed)."""
    processed = logits / temperature
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    entropy = torch.distributions.Categorical(logits=processed.float()).entropy()
    return probs, torch.argmax(processed, dim=-1), entropy


@pytest.mark.parametrize("backend", BACKENDS)
def test_diffusion_gemma_step_quantities(backend):
    logits = _logits(2, 8, 300, seed=23, scale=3.0)
    temperature = 0.7
    tokens, conf, argmax = ddiff.predict_tokens(logits, temperature=temperature, confidence="neg_entropy",
                                                confidence_from="sampling", return_argmax=True, seed=4,
                                                backend=backend)
    _, gemma_argmax, gemma_entropy = gemma_step_reference(logits, temperature)
    assert torch.equal(argmax, gemma_argmax)
    assert torch.allclose(conf, -gemma_entropy, atol=2e-5)
    flat = ddiff.sample(logits.flatten(0, 1), temperature=temperature, seed=4, backend=backend)
    assert torch.equal(tokens.flatten(), flat)


def test_diffusion_gemma_step_samples_the_tempered_softmax():
    n, temperature = 6000, 0.7
    logits_row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.1])
    logits = logits_row.expand(1, n, -1).to(DEVICE)
    tokens, _, _ = ddiff.predict_tokens(logits, temperature=temperature, confidence="neg_entropy",
                                        confidence_from="sampling", return_argmax=True, seed=9, backend="torch")
    probs, _, _ = gemma_step_reference(logits_row[None], temperature)
    assert _chi_square(tokens.flatten(), probs[0]) > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("confidence_from", ["raw", "sampling"])
def test_confidence_suppress_tokens(backend, kind, confidence_from):
    vocab = 40
    logits = _logits(2, 5, vocab, seed=24)
    logits[:, :3, 7] = 7.0  # drawn at most of these positions
    ids = [7, 30]
    kwargs = dict(temperature=0.9, top_k=12, confidence=kind, confidence_from=confidence_from, seed=5)
    tokens, conf = ddiff.predict_tokens(logits, confidence_suppress_tokens=ids, backend=backend, **kwargs)
    plain_tokens, plain_conf = ddiff.predict_tokens(logits, backend=backend, **kwargs)
    assert torch.equal(tokens, plain_tokens)  # the draw never sees them
    assert bool((tokens == 7).any())
    if kind == "random":
        assert torch.equal(conf, plain_conf)
        return
    # The confidence distribution is the one without the ids (after the filters), renormalised.
    if confidence_from == "raw":
        dist = logits.double()
    else:
        dist = ddiff.filter_logits(logits / 0.9, top_k=12, backend="torch").double()
    dist[..., ids] = float("-inf")
    expected = independent_confidence(dist, tokens.clamp(min=0), kind)
    if kind == "prob":
        assert bool((conf[tokens == 7] == 0).all())
    assert torch.allclose(conf.double(), expected, atol=2e-6)
    ref = ddiff.predict_tokens(logits, confidence_suppress_tokens=ids, backend="torch", **kwargs)
    assert torch.allclose(ref[1], conf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["prob", "margin", "neg_entropy"])
def test_filtered_rows_split_across_programs(kind):
    """The candidate path's passes split a row into runs (target_items); the raw-logit
    confidence is summed per run relative to the exact maximum of its distribution, even when a
    confidence-suppressed id sits far above everything else."""
    from ddiff.kernels import sampling as kernels

    vocab = 3 * kernels.FILTER_BLOCK + 5
    logits = _logits(1, 4, vocab, seed=31).reshape(4, vocab)
    logits[0, 100] = 150.0  # suppressed from the confidence only: exp(x - 150) underflows for the rest
    logits[1, 2 * kernels.FILTER_BLOCK + 1] = 9.0
    mask = torch.tensor([True, True, False, True], device=DEVICE)
    suppress = torch.tensor([3], device=DEVICE)
    csupp = torch.tensor([100, 2 * kernels.FILTER_BLOCK + 1], device=DEVICE)
    seed = torch.tensor([9], device=DEVICE)
    for confidence_from in ("raw", "sampling"):
        expected = ddiff.predict_tokens(logits[None], mask[None], temperature=0.8, top_k=30, confidence=kind,
                                        confidence_from=confidence_from, suppress_tokens=[3],
                                        confidence_suppress_tokens=csupp.tolist(), seed=9, offset=2,
                                        backend="torch", return_argmax=True)
        for items in (1, 4, 11):
            tokens, conf, argmax = kernels.predict_tokens_fwd(
                logits, mask, suppress, None, 0.8, None, 30, None, 1.0, None, 0.0, seed, 0, 2, confidence=kind,
                conf_raw=confidence_from == "raw", filtered=True, conf_suppress=csupp, return_argmax=True,
                target_items=items)
            assert torch.equal(tokens, expected[0][0]) and torch.equal(argmax, expected[2][0]), (confidence_from, items)
            assert torch.allclose(conf, expected[1][0], rtol=1e-5, atol=1e-6), (confidence_from, items)


@pytest.mark.parametrize("backend", BACKENDS)
def test_confidence_suppress_tokens_empty_distribution_and_bad_ids(backend):
    logits = torch.tensor([[[0.0, 5.0, 1.0]]], device=DEVICE)
    # top_k=1 keeps only id 1, which the confidence then loses: the least value of each kind.
    for kind, least in [("prob", 0.0), ("margin", 0.0), ("neg_entropy", float("-inf"))]:
        tokens, conf = ddiff.predict_tokens(logits, temperature=0.0, top_k=1, confidence=kind,
                                            confidence_from="sampling", confidence_suppress_tokens=[1],
                                            backend=backend)
        assert tokens.item() == 1 and conf.item() == least, kind
    with pytest.raises(ValueError, match="confidence_suppress_tokens"):
        ddiff.predict_tokens(logits, confidence_suppress_tokens=[3], backend=backend)
    with pytest.raises(TypeError, match="confidence_suppress_tokens"):
        ddiff.predict_tokens(logits, confidence_suppress_tokens=[1.0], backend=backend)
    with pytest.raises(TypeError, match="return_argmax"):
        ddiff.predict_tokens(logits, return_argmax=1, backend=backend)


# ---------------------------------------------------------------------------------------------
# One LLaDA low_confidence step, against a straight re-implementation of LLaDA's loop
# ---------------------------------------------------------------------------------------------


def llada_step(x, logits, mask_id, num_transfer, temperature, noise_u=None, remasking="low_confidence",
               confidence_eos_eot_inf=None):
    """One inner iteration of LLaDA's `generate` (GSAI-ML/LLaDA generate.py), written from its
    published algorithm: Gumbel noise in float64, argmax, softmax confidence of the argmax
    token, -inf outside the masked positions, a per-row topk, commit.
    ``confidence_eos_eot_inf=(eos, eot)`` runs upstream's chained assignment
    ``logits_with_noise[:, :, eos] = logits[:, :, eot] = -inf`` after the argmax (at
    temperature 0 ``logits_with_noise`` *is* ``logits``).
    """
    logits = logits.double().clone()
    if temperature == 0:
        noisy = logits
    else:
        # LLaDA: logits.exp() / (-log(u)) ** temperature, i.e. logits/T - log(-log u) after a log.
        noisy = logits.exp() / (-torch.log(noise_u)) ** temperature
    x0 = noisy.argmax(-1)
    if confidence_eos_eot_inf is not None:
        eos, eot = confidence_eos_eot_inf
        noisy[:, :, eos] = logits[:, :, eot] = -torch.inf
    p = torch.softmax(logits, -1)
    x0_p = p.gather(-1, x0[..., None]).squeeze(-1)
    mask_index = x == mask_id
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, float("-inf")))
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    for j in range(confidence.shape[0]):
        _, idx = torch.topk(confidence[j], k=int(num_transfer[j]))
        transfer[j, idx] = True
    return torch.where(transfer, x0, x)


def ddiff_llada_step(x, logits, mask_id, num_transfer, temperature, seed, backend, confidence_suppress_tokens=None):
    mask = x == mask_id
    tokens, conf = ddiff.predict_tokens(logits, mask, temperature, confidence="prob", confidence_from="raw",
                                        confidence_suppress_tokens=confidence_suppress_tokens, seed=seed,
                                        backend=backend)
    commit = ddiff.select_transfer(conf, mask, num_transfer=num_transfer, backend=backend)
    return torch.where(commit, tokens, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_llada_low_confidence_step(backend, temperature):
    vocab, mask_id, batch, length, steps = 60, 59, 2, 12, 4
    logits = _logits(batch, length, vocab, seed=10, scale=3.0)
    logits[..., mask_id] = -5.0  # LLaDA's model rarely predicts the mask token; keep it possible
    x = torch.randint(0, vocab - 1, (batch, length), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x[:, 4:] = mask_id
    schedule = ddiff.num_transfer_tokens(x == mask_id, steps)
    # Matched seeds: LLaDA's uniform u for column i is 1 - ddiff's uniform (its Gumbel is
    # -log(-log u), ddiff's is -log(-log(1 - u))); V <= NOISE_TILE, so ddiff's race is per column.
    rows = torch.arange(batch * length, device=DEVICE).view(batch, length, 1)
    cols = torch.arange(vocab, device=DEVICE).view(1, 1, vocab)
    u = ref_rng.philox_uniform(torch.tensor(77, device=DEVICE), 0, rows, cols, ref_rng.STREAM_TOKEN)
    ours = ddiff_llada_step(x, logits, mask_id, schedule[:, 0], temperature, 77, backend)
    theirs = llada_step(x, logits, mask_id, schedule[:, 0], temperature, noise_u=1.0 - u.double())
    assert torch.equal(ours, theirs)
    assert int((ours != x).sum()) == int(schedule[:, 0].sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_llada_confidence_eos_eot_inf_step(backend, temperature):
    vocab, mask_id, eos, eot, batch, length = 60, 59, 57, 58, 2, 12
    logits = _logits(batch, length, vocab, seed=13, scale=1.0)
    logits[..., mask_id] = -5.0
    logits[:, 4:6, eos] = 4.0  # EOS / EOT are the argmax here, with the most confidence
    logits[:, 6:8, eot] = 4.0
    x = torch.randint(0, vocab - 3, (batch, length), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    x[:, 2:] = mask_id
    # Fewer commits than positions of nonzero confidence: no tie at 0 decides the selection.
    num_transfer = torch.tensor([4, 3], device=DEVICE)
    rows = torch.arange(batch * length, device=DEVICE).view(batch, length, 1)
    cols = torch.arange(vocab, device=DEVICE).view(1, 1, vocab)
    u = ref_rng.philox_uniform(torch.tensor(78, device=DEVICE), 0, rows, cols, ref_rng.STREAM_TOKEN)
    theirs = llada_step(x, logits, mask_id, num_transfer, temperature, noise_u=1.0 - u.double(),
                        confidence_eos_eot_inf=(eos, eot))
    # Upstream's EOS write lands in the noisy copy, which only aliases the logits at T = 0.
    ids = [eos, eot] if temperature == 0 else [eot]
    ours = ddiff_llada_step(x, logits, mask_id, num_transfer, temperature, 78, backend, confidence_suppress_tokens=ids)
    assert torch.equal(ours, theirs)
    plain = llada_step(x, logits, mask_id, num_transfer, temperature, noise_u=1.0 - u.double())
    assert not torch.equal(plain, theirs)  # the option changes which positions are committed


# ---------------------------------------------------------------------------------------------
# Posterior steps: chi-square against the exact posteriors
# ---------------------------------------------------------------------------------------------


def _chi_square(samples, probs):
    counts = torch.bincount(samples.cpu(), minlength=probs.numel()).double()
    probs = probs.double() / probs.double().sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "drew an outcome of probability 0"
    return scipy_stats.chisquare(counts[support].numpy(), (probs[support] * samples.numel()).numpy()).pvalue


@pytest.mark.parametrize("backend,n", [("torch", 6000), ("triton", 160)])
def test_mdlm_step_matches_exact_posterior(backend, n):
    vocab, mask_id = 6, 5
    logits_row = torch.tensor([0.5, -1.0, 1.2, 0.0, 0.3, 2.0])
    logits = logits_row.expand(1, n, vocab).contiguous().to(DEVICE)
    x_t = torch.full((1, n), mask_id, device=DEVICE)
    alpha_t, alpha_s = 0.3, 0.55
    x_s = ddiff.mdlm_step(logits, x_t, mask_id, alpha_t, alpha_s, temperature=1.0, seed=4, backend=backend)
    # MDLM _ddpm_update: q_xs = p_x0 * (α_s − α_t) with the mask prob (1 − α_s), over (1 − α_t).
    p_x0 = torch.softmax(logits_row.masked_fill(torch.arange(vocab) == mask_id, float("-inf")), -1)
    q = p_x0 * (alpha_s - alpha_t)
    q[mask_id] = 1 - alpha_s
    assert _chi_square(x_s.flatten(), q / (1 - alpha_t)) > 1e-4


@pytest.mark.parametrize("backend,n", [("torch", 6000), ("triton", 160)])
def test_udlm_step_matches_exact_posterior(backend, n):
    vocab = 5
    logits_row = torch.tensor([0.5, -1.0, 1.2, 0.0, 0.3])
    logits = logits_row.expand(1, n, vocab).contiguous().to(DEVICE)
    x_t = torch.full((1, n), 3, device=DEVICE)
    alpha_t, alpha_s = 0.4, 0.7
    x_s = ddiff.udlm_step(logits, x_t, alpha_t, alpha_s, seed=8, backend=backend)
    # The closed form of discrete-diffusion-guidance's _compute_posterior, materialised.
    x0 = torch.softmax(logits_row.double(), -1)
    onehot = torch.nn.functional.one_hot(torch.tensor(3), vocab).double()
    alpha_ts = alpha_t / alpha_s
    numerator = (alpha_t * vocab * x0 * onehot + (alpha_ts - alpha_t) * onehot + (alpha_s - alpha_t) * x0
                 + (1 - alpha_ts) * (1 - alpha_s) / vocab)
    q = numerator / (alpha_t * vocab * x0[3] + 1 - alpha_t)
    assert abs(q.sum().item() - 1) < 1e-12
    assert _chi_square(x_s.flatten(), q) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_posterior_steps_triton_equals_reference(dtype):
    vocab, mask_id = 40, 39
    logits = _logits(2, 8, vocab, dtype=dtype, seed=12)
    x_t = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x_t[:, ::2] = mask_id
    alpha_t = torch.tensor([0.2, 0.6], device=DEVICE)
    alpha_s = torch.tensor([0.5, 1.0], device=DEVICE)
    for kwargs in [dict(), dict(top_p=0.8, temperature=0.7)]:
        a = ddiff.mdlm_step(logits, x_t, mask_id, alpha_t, alpha_s, seed=5, offset=1, backend="torch", **kwargs)
        b = ddiff.mdlm_step(logits, x_t, mask_id, alpha_t, alpha_s, seed=5, offset=1, backend="triton", **kwargs)
        assert torch.equal(a, b)
        assert torch.equal(a[x_t != mask_id], x_t[x_t != mask_id])
        assert not bool(((a != x_t) & (a == mask_id)).any())
    a = ddiff.udlm_step(logits, x_t, alpha_t, alpha_s, seed=5, backend="torch")
    b = ddiff.udlm_step(logits, x_t, alpha_t, alpha_s, seed=5, backend="triton")
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mdlm_step_filters_triton_equals_reference(dtype):
    vocab, mask_id = 300, 299
    logits = _logits(2, 6, vocab, dtype=dtype, seed=14)
    x_t = torch.full((2, 6), mask_id, device=DEVICE)
    x_t[:, 0] = 3
    for kwargs in [dict(top_k=5), dict(top_k=torch.tensor([3, 0, 9, 1, 300, 7] * 2, device=DEVICE), min_p=0.1),
                   dict(top_p=0.7, top_p_mode="bd3lm", temperature=0.9)]:
        a = ddiff.mdlm_step(logits, x_t, mask_id, 0.2, 0.9, seed=6, backend="torch", **kwargs)
        b = ddiff.mdlm_step(logits, x_t, mask_id, 0.2, 0.9, seed=6, backend="triton", **kwargs)
        assert torch.equal(a, b), kwargs


def test_mdlm_step_top_k_matches_exact_posterior():
    # Dream alg="origin": reveal with probability 1 - s/t, the token from the top-k softmax.
    n, vocab, mask_id = 6000, 7, 6
    logits_row = torch.tensor([0.5, -1.0, 1.2, 0.0, 0.3, 0.9, 2.0])
    logits = logits_row.expand(1, n, vocab).contiguous().to(DEVICE)
    x_t = torch.full((1, n), mask_id, device=DEVICE)
    alpha_t, alpha_s = 0.3, 0.55
    x_s = ddiff.mdlm_step(logits, x_t, mask_id, alpha_t, alpha_s, top_k=3, seed=4, backend="torch")
    kept = torch.tensor([True, False, True, False, False, True, False])  # top 3 of the ids without the mask
    p_x0 = torch.softmax(logits_row.masked_fill(~kept, float("-inf")), -1)
    q = p_x0 * (alpha_s - alpha_t)
    q[mask_id] = 1 - alpha_s
    assert _chi_square(x_s.flatten(), q / (1 - alpha_t)) > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_mdlm_final_step_reveals_everything(backend):
    logits = _logits(2, 7, 9)
    x_t = torch.full((2, 7), 8, device=DEVICE)
    x_s = ddiff.mdlm_step(logits, x_t, 8, 0.9, 1.0, seed=0, backend=backend)
    assert not bool((x_s == 8).any())
    # alpha_s == alpha_t: nothing moves.
    assert torch.equal(ddiff.mdlm_step(logits, x_t, 8, 0.4, 0.4, seed=0, backend=backend), x_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_posterior_step_bad_inputs(backend):
    logits = _logits(2, 3, 10)
    x_t = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
    for a_t, a_s, match in [(-0.1, 0.5, "alpha_t"), (0.2, 1.5, "alpha_s"), (0.6, 0.5, "alpha_s"),
                            (torch.tensor([0.1, 0.9], device=DEVICE), 0.5, "alpha_s"),
                            (torch.ones(4, device=DEVICE) * 0.1, 0.5, "alpha_t")]:
        with pytest.raises(ValueError, match=match):
            ddiff.mdlm_step(logits, x_t, 9, a_t, a_s, backend=backend)
        with pytest.raises(ValueError, match=match):
            ddiff.udlm_step(logits, x_t, a_t, a_s, backend=backend)
    with pytest.raises(ValueError, match="x_t"):
        ddiff.mdlm_step(logits, x_t[:, :2], 9, 0.1, 0.5, backend=backend)
    with pytest.raises(TypeError, match="x_t"):
        ddiff.mdlm_step(logits, x_t.float(), 9, 0.1, 0.5, backend=backend)
    with pytest.raises(ValueError, match="mask_token_id"):
        ddiff.mdlm_step(logits, x_t, 10, 0.1, 0.5, backend=backend)
    with pytest.raises(ValueError, match="x_t"):
        ddiff.udlm_step(logits, x_t + 10, 0.1, 0.5, backend=backend)


def test_decoding_ops_compile_fullgraph():
    def step(logits, x):
        mask = x == 9
        tokens, conf = ddiff.predict_tokens(logits, mask, 0.0, suppress_tokens=[9], backend="torch")
        commit = ddiff.select_transfer(conf, mask, num_transfer=2, backend="torch")
        x = torch.where(commit, tokens, x)
        return ddiff.mdlm_step(logits, x, 9, 0.3, 0.6, seed=1, backend="torch")

    logits = _logits(2, 6, 10).cpu()
    x = torch.full((2, 6), 9)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert torch.equal(compiled(logits, x), step(logits, x))


def test_sync_checks_off_skips_value_checks_and_flags_rows():
    logits = _logits(1, 3, 10)
    logits[0, 1, 2] = float("nan")
    with ddiff.sync_checks(False):
        tokens, conf = ddiff.predict_tokens(logits, backend="torch")
        assert tokens[0, 1] == -1 and torch.isnan(conf[0, 1])
        # Python-level checks still run.
        with pytest.raises(ValueError, match="confidence"):
            ddiff.predict_tokens(logits, confidence="nope", backend="torch")
    with pytest.raises(ValueError, match="at batch 0, position 1 "):
        ddiff.predict_tokens(logits, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_checks_off_marks_invalid_rows(backend):
    logits = _logits(1, 3, 10)
    logits[0, 1, 2] = float("nan")
    with ddiff.sync_checks(False):
        tokens, conf = ddiff.predict_tokens(logits, backend=backend)
    assert tokens[0, 1] == -1 and torch.isnan(conf[0, 1])
    assert bool((tokens[0, [0, 2]] >= 0).all())
