"""TokenDiffusionPipeline / TokenDiffusionScheduler on tiny checkpoints trained by ddiff.train.

The checkpoints under tests/assets/tiny_token_{mdlm,udlm,bd3lm} were trained by
``scripts/train_tiny_token_model.py`` on ``sorted_digits``: 16 digits in non-decreasing order.
An untrained model almost never produces one; the trained ones mostly do, and a sampler with a
wrong posterior does not.
"""

import os

import pytest
import torch
from upstream import bd3lm as upstream_bd3lm

import ddiff
from ddiff.denoiser import block_causal_mask, denoiser_logits, tiny_denoiser
from ddiff.pipelines.token_diffusion_scheduler import _AUX_POSITION, AUX_OFFSET
from ddiff.reference.rng import STREAM_TOKEN, philox_gumbel
from ddiff.pipelines import TokenDiffusionPipeline, TokenDiffusionPipelineOutput
from ddiff.pipelines.token_diffusion_scheduler import TokenDiffusionScheduler
from ddiff.training import is_valid

scipy_stats = pytest.importorskip("scipy.stats")

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
LANG = "sorted_digits"
SEQ_LEN = 16
VALID_THRESHOLD = 0.5  # trained samplers stay well above it, broken ones far below
N_SAMPLES = 128


def load(name, **kwargs):
    return TokenDiffusionPipeline.from_pretrained(os.path.join(ASSETS, f"tiny_token_{name}"), backend="torch",
                                                  **kwargs)


@pytest.fixture(scope="module")
def mdlm():
    return load("mdlm")


@pytest.fixture(scope="module")
def udlm():
    return load("udlm")


@pytest.fixture(scope="module")
def bd3lm():
    return load("bd3lm")


def validity(pipe, steps=32, seed=0, **kwargs):
    out = pipe(batch_size=N_SAMPLES, seq_len=SEQ_LEN, num_inference_steps=steps, seed=seed, output_type="ids",
               progress=False, **kwargs)
    return float(is_valid(LANG, out.sequences).float().mean())


def untrained_like(pipe):
    torch.manual_seed(0)
    cfg = pipe.model.config
    model = tiny_denoiser(cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
                          num_heads=cfg.num_attention_heads).eval()
    return TokenDiffusionPipeline(model, pipe.tokenizer, process=pipe.process, mask_token_id=pipe.mask_token_id,
                                  backend="torch")


def test_asset_sizes():
    for name in ("mdlm", "udlm", "bd3lm"):
        directory = os.path.join(ASSETS, f"tiny_token_{name}")
        assert os.path.getsize(os.path.join(directory, "model.safetensors")) < 2 * 2**20
        assert os.path.exists(os.path.join(directory, "scheduler_config.json"))


# ---------------------------------------------------------------------------------------------
# Trained vs untrained vs wrong posterior
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mdlm", "udlm"])
def test_trained_model_samples_valid_sentences(name, request):
    pipe = request.getfixturevalue(name)
    trained = validity(pipe)
    untrained = validity(untrained_like(pipe))
    assert trained >= VALID_THRESHOLD, (name, trained)
    assert untrained <= 0.02, (name, untrained)


def _wrong_mdlm_step(real):
    # Confuses "stays masked" with "is revealed": reveals with probability (1 - α_s)/(1 - α_t)
    # (BD3LM's mask_prob) instead of (α_s - α_t)/(1 - α_t).
    def step(logits, x_t, mask_token_id, alpha_t, alpha_s, **kwargs):
        return real(logits, x_t, mask_token_id, 0.0, (1 - alpha_s) / (1 - alpha_t), **kwargs)
    return step


def _udlm_ignores_x_t(real):
    # Draws x_s from x̂0 alone (the α_t = 0, α_s = 1 posterior) at every step.
    def step(logits, x_t, alpha_t, alpha_s, **kwargs):
        return real(logits, x_t, 0.0, 1.0, **kwargs)
    return step


def _udlm_ignores_model(real):
    # A posterior that never looks at x̂0 (uniform logits).
    def step(logits, x_t, alpha_t, alpha_s, **kwargs):
        return real(torch.zeros_like(logits), x_t, alpha_t, alpha_s, **kwargs)
    return step


@pytest.mark.parametrize("name,op,wrong", [("mdlm", "mdlm_step", _wrong_mdlm_step),
                                           ("udlm", "udlm_step", _udlm_ignores_x_t),
                                           ("udlm", "udlm_step", _udlm_ignores_model)])
def test_wrong_posterior_fails_the_validity_test(name, op, wrong, request, monkeypatch):
    pipe = request.getfixturevalue(name)
    monkeypatch.setattr(ddiff, op, wrong(getattr(ddiff, op)))
    rate = validity(pipe)
    assert rate < VALID_THRESHOLD, (name, wrong.__name__, rate)  # the validity test would fail


def test_bd3lm_block_sampling_first_hitting_and_nucleus(bd3lm):
    assert validity(bd3lm, block_size=4, first_hitting=True, top_p=0.9) >= VALID_THRESHOLD
    assert validity(bd3lm, steps=64, block_size=4) >= VALID_THRESHOLD


def bd3lm_draws(seed: int, width: int):
    """The draws of ddiff's first-hitting step, for the restated BD3LM loop: the position race of
    ``ddiff.sample`` over equal logits (offset ``step + 3 · 2^48``, row b) and the token race of
    ``ddiff.mdlm_step`` (row ``b · width + l``, offset ``step``); one noise tile (V, W < 1024)."""

    def choose_fn(step, masked):
        g = philox_gumbel(torch.tensor(seed), step + _AUX_POSITION * AUX_OFFSET,
                          torch.arange(masked.shape[0])[:, None], torch.arange(width)[None, :], STREAM_TOKEN)
        return torch.where(masked, g, float("-inf")).argmax(dim=1)

    def categorical_fn(step, probs):
        B, L, V = probs.shape
        rows = (torch.arange(B)[:, None] * width + torch.arange(L)[None, :])[..., None]
        g = philox_gumbel(torch.tensor(seed), step, rows, torch.arange(V)[None, None, :], STREAM_TOKEN)
        return (probs.log() + g.double()).argmax(dim=-1)

    return choose_fn, categorical_fn


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.6])
def test_bd3lm_first_hitting_matches_the_published_sampler(bd3lm, top_p):
    """BD3LM's semi-AR first-hitting sampler with its nucleus (tests/upstream/bd3lm.py), fed
    ddiff's draws, gives the pipeline's tokens: block order, the one-mask-per-step reveal, the
    nucleus rule (the default on the BD3LM path) and the finished blocks as context."""
    model, block = bd3lm.model, 4
    choose_fn, categorical_fn = bd3lm_draws(13, block)
    def forward(x):  # BD3LM's block-causal attention over the prefix
        return denoiser_logits(model, x, attention_mask=block_causal_mask(0, x.shape[1], x.shape[1], block))

    want, nfe = upstream_bd3lm.semi_ar_sampler(forward, 1, SEQ_LEN // block, block, block,
                                               mask_index=bd3lm.mask_token_id, bos_id=0, nucleus_p=top_p,
                                               choose_fn=choose_fn, categorical_fn=categorical_fn)
    out = bd3lm(batch_size=1, seq_len=SEQ_LEN, num_inference_steps=16, block_size=block, first_hitting=True,
                top_p=None if top_p == 1.0 else top_p, prefix_ids=[0], seed=13, output_type="ids", progress=False)
    assert out.sequences.tolist() == want.tolist()
    assert out.nfe == nfe
    if top_p == 0.6:  # transformers' rule keeps the crossing token: another distribution, other tokens
        other = bd3lm(batch_size=1, seq_len=SEQ_LEN, num_inference_steps=16, block_size=block, first_hitting=True,
                      top_p=top_p, top_p_mode="inclusive", prefix_ids=[0], seed=13, output_type="ids",
                      progress=False)
        assert other.sequences.tolist() != want.tolist()


def test_hybrid_with_lambda_one_matches_absorbing_quality(mdlm):
    pipe = TokenDiffusionPipeline(mdlm.model, mdlm.tokenizer, process="hybrid", mask_fraction=1.0, backend="torch")
    assert validity(pipe) >= VALID_THRESHOLD


# ---------------------------------------------------------------------------------------------
# Fixed tokens, NFE, caching, backends
# ---------------------------------------------------------------------------------------------


def _record(store):
    def callback(pipe, step, t, kwargs):
        store.append(kwargs["x"].clone())
    return callback


@pytest.mark.parametrize("name,kwargs", [("mdlm", {}), ("udlm", {}), ("mdlm", dict(block_size=4)),
                                         ("bd3lm", dict(first_hitting=True)), ("mdlm", dict(process="hybrid"))])
def test_prefix_and_infill_positions_never_change(name, kwargs, request):
    base = request.getfixturevalue(name)
    process = kwargs.pop("process", None)
    pipe = base if process is None else TokenDiffusionPipeline(base.model, base.tokenizer, process=process,
                                                               backend="torch")
    b = 3
    prefix = torch.tensor([0, 1, 1])
    infill = torch.ones(b, SEQ_LEN, dtype=torch.bool)
    infill[:, 9] = False
    infill[1, 12:] = False
    infill_ids = torch.full((b, SEQ_LEN), 7)
    infill_ids[:, 12:] = 9
    fixed = ~infill
    fixed[:, :3] = True
    values = infill_ids.clone()
    values[:, :3] = prefix
    seen = []
    out = pipe(batch_size=b, seq_len=SEQ_LEN, num_inference_steps=12, prefix_ids=prefix, infill_mask=infill,
               infill_ids=infill_ids, seed=1, output_type="ids", progress=False, callback_on_step_end=_record(seen),
               **kwargs)
    assert len(seen) > 0
    for x in seen + [out.sequences]:
        assert torch.equal(x[fixed], values[fixed])


def test_nfe_counts_model_calls_and_skips_unchanged_steps(mdlm):
    calls = []
    model = mdlm.model
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        seen = []
        steps = 64
        out = mdlm(batch_size=1, seq_len=SEQ_LEN, num_inference_steps=steps, seed=3, output_type="ids",
                   progress=False, callback_on_step_end=_record(seen))
    finally:
        handle.remove()
    assert out.nfe == len(calls)
    changed = [not torch.equal(a, b) for a, b in zip(seen[:-1], seen[1:])]
    first_changed = not torch.equal(seen[0], torch.full_like(seen[0], mdlm.mask_token_id))
    changed = [first_changed] + changed
    assert out.nfe == 1 + sum(changed[:-1])  # a step reuses the logits iff the previous one changed nothing
    assert out.nfe < steps  # 16 positions over 64 steps: many steps change nothing


def test_nfe_equals_steps_when_every_step_changes_something(udlm):
    out = udlm(batch_size=32, seq_len=SEQ_LEN, num_inference_steps=8, seed=0, output_type="ids", progress=False)
    assert out.nfe == 8


def test_first_hitting_reveals_one_position_per_step(mdlm):
    seen = []
    out = mdlm(batch_size=2, seq_len=SEQ_LEN, num_inference_steps=4, prefix_ids=[0, 0], first_hitting=True, seed=0,
               output_type="ids", progress=False, callback_on_step_end=_record(seen))
    masks = [int((x == mdlm.mask_token_id).sum(-1).max()) for x in seen]
    assert masks == list(range(SEQ_LEN - 3, -1, -1))
    assert out.nfe == SEQ_LEN - 2 and not (out.sequences == mdlm.mask_token_id).any()


def test_block_causal_kv_cache_matches_full_recompute(bd3lm):
    lengths = {}
    for use_kv_cache in (True, False):
        seen = []
        handle = bd3lm.model.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
        try:
            out = bd3lm(batch_size=2, seq_len=SEQ_LEN, num_inference_steps=16, block_size=4, prefix_ids=[0, 1],
                        seed=5, output_type="ids", progress=False, use_kv_cache=use_kv_cache)
        finally:
            handle.remove()
        lengths[use_kv_cache] = (out, seen)
    (cached, n_cached), (full, n_full) = lengths[True], lengths[False]
    assert torch.equal(cached.sequences, full.sequences) and cached.nfe == full.nfe == len(n_cached)
    assert max(n_cached) <= 8 and sum(n_cached) < sum(n_full)  # at most one clean + one noisy block


def test_seed_and_generator_reproduce(mdlm):
    a = mdlm(batch_size=2, seq_len=8, num_inference_steps=6, seed=11, output_type="ids", progress=False)
    b = mdlm(batch_size=2, seq_len=8, num_inference_steps=6, seed=11, output_type="ids", progress=False)
    c = mdlm(batch_size=2, seq_len=8, num_inference_steps=6, generator=torch.Generator().manual_seed(4),
             output_type="ids", progress=False)
    d = mdlm(batch_size=2, seq_len=8, num_inference_steps=6, generator=torch.Generator().manual_seed(4),
             output_type="ids", progress=False)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(c.sequences, d.sequences)


@pytest.mark.parametrize("process", ["absorbing", "uniform", "hybrid"])
def test_torch_and_triton_backends_give_the_same_tokens(process, mdlm, udlm):
    base = udlm if process == "uniform" else mdlm
    outs = []
    for backend in ("torch", "triton"):
        pipe = TokenDiffusionPipeline(base.model, base.tokenizer, process=process, backend=backend)
        kwargs = dict(temperature=0.8, top_p=0.9) if process == "absorbing" else {}
        outs.append(pipe(batch_size=1, seq_len=8, num_inference_steps=3, seed=7, output_type="ids", progress=False,
                         **kwargs).sequences)
    assert torch.equal(outs[0], outs[1])


def test_output_dataclass_and_text(mdlm):
    out = mdlm(batch_size=2, seq_len=SEQ_LEN, num_inference_steps=8, seed=0, progress=False)
    assert isinstance(out, TokenDiffusionPipelineOutput)
    assert out.sequences.dtype == torch.long and out.sequences.shape == (2, SEQ_LEN)
    assert len(out.texts) == 2 and all(len(t.split()) == SEQ_LEN for t in out.texts)
    assert 1 <= out.nfe <= 8 and out.steps == 8 and len(out.block_times) == 1
    assert mdlm(batch_size=1, seq_len=4, num_inference_steps=2, seed=0, output_type="ids", progress=False).texts is None


def test_callback_can_replace_sequences(mdlm):
    def callback(pipe, step, t, kwargs):
        x = kwargs["x"].clone()
        x[:, -1] = 9
        return {"x": x}

    out = mdlm(batch_size=2, seq_len=8, num_inference_steps=4, seed=0, output_type="ids", progress=False,
               callback_on_step_end=callback)
    assert (out.sequences[:, -1] == 9).all()


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(seq_len=0), "seq_len"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(prefix_ids=list(range(10)) * 2), "longer than seq_len"),
    (dict(infill_mask=torch.ones(2, 5, dtype=torch.bool)), "infill_mask"),
    (dict(infill_mask=torch.ones(1, 16, dtype=torch.bool), batch_size=2), "infill_mask"),
    (dict(infill_mask=torch.zeros(1, 16, dtype=torch.bool)), "infill_ids"),
    (dict(prefix_ids=[10]), "mask token"),
    (dict(num_inference_steps=2, block_size=4), "total step budget"),
    (dict(top_p=0.0), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(output_type="pil"), "output_type"),
    (dict(seed=1, generator=torch.Generator()), "either"),
])
def test_bad_inputs_raise_clear_errors(mdlm, kwargs, match):
    call = dict(batch_size=1, seq_len=16, num_inference_steps=4, progress=False)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mdlm(**call)


def test_process_specific_errors(mdlm, udlm):
    with pytest.raises(ValueError, match="cannot use mask_token_id=3"):
        TokenDiffusionPipeline(udlm.model, process="uniform", mask_token_id=3)
    with pytest.raises(ValueError, match="needs a `mask_token_id`"):
        TokenDiffusionPipeline(mdlm.model, process="absorbing")
    with pytest.raises(ValueError, match="first-hitting|first_hitting"):
        udlm(batch_size=1, seq_len=8, num_inference_steps=4, first_hitting=True, progress=False)
    with pytest.raises(ValueError, match="temperature 0"):
        udlm(batch_size=1, seq_len=8, num_inference_steps=4, temperature=0.0, progress=False)
    with pytest.raises(ValueError, match="process"):
        TokenDiffusionPipeline(mdlm.model, mdlm.tokenizer, process="sedd")
    uniform_no_mask = TokenDiffusionPipeline(udlm.model, process="uniform", vocab_size=10)
    assert uniform_no_mask.scheduler.num_uniform_tokens == 10


class _NaNModel(torch.nn.Module):
    def forward(self, input_ids, **kwargs):
        return torch.full((*input_ids.shape, 11), float("nan"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_logits_raise(backend):
    pipe = TokenDiffusionPipeline(_NaNModel(), process="absorbing", mask_token_id=10, vocab_size=11, backend=backend)
    with pytest.raises(ValueError, match="NaN"):
        pipe(batch_size=1, seq_len=4, num_inference_steps=2, seed=0, output_type="ids", progress=False)


# ---------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------


def test_sample_prior_per_process():
    g = torch.Generator().manual_seed(0)
    v, m = 6, 5
    absorbing = TokenDiffusionScheduler(v, m, "absorbing").sample_prior((4, 8), generator=g)
    assert (absorbing == m).all()
    uniform = TokenDiffusionScheduler(v, m, "uniform").sample_prior((4000,), generator=g)
    assert set(uniform.tolist()) == set(range(5))
    hybrid = TokenDiffusionScheduler(v, 2, "hybrid", mask_fraction=0.3).sample_prior((20000,), generator=g)
    frac = float((hybrid == 2).float().mean())
    assert abs(frac - 0.3) < 0.02
    counts = torch.bincount(hybrid[hybrid != 2], minlength=v)
    assert counts[2] == 0 and scipy_stats.chisquare(counts[[0, 1, 3, 4, 5]].numpy()).pvalue > 1e-3


def test_scheduler_config_roundtrip(tmp_path):
    sched = TokenDiffusionScheduler(11, 10, "hybrid", alpha_schedule="cosine", eps=0.01, mask_fraction=0.25)
    sched.save_config(tmp_path)
    again = TokenDiffusionScheduler.from_pretrained(tmp_path)
    assert again.config == sched.config
    sched.set_timesteps(8)
    assert sched.timesteps[0] == 1 and sched.timesteps[-1] == 0 and sched.alphas[-1] == 1
    assert torch.all(sched.alphas[1:] >= sched.alphas[:-1])


def dense_hybrid_posterior(x0_hat, i, a_t, a_s, lam, mask):
    """Bayes, brute force: q(x_s | x_t = i, x̂0) ∝ q(x_t = i | x_s) [α_s x̂0 + (1 - α_s) π]."""
    v = x0_hat.numel()
    pi = torch.full((v,), (1 - lam) / (v - 1), dtype=torch.float64)
    pi[mask] = lam
    kernel = (a_t / a_s) * torch.eye(v, dtype=torch.float64) + (1 - a_t / a_s) * pi[None, :]
    post = kernel[:, i] * (a_s * x0_hat + (1 - a_s) * pi)
    return post / post.sum()


def mixture_from_weights(w, x0_hat, i, mask):
    v = x0_hat.numel()
    uniform = torch.full((v,), 1.0 / (v - 1), dtype=torch.float64)
    uniform[mask] = 0
    dist = w[0] * x0_hat + w[1] * uniform
    dist[mask] += w[2]
    dist[i] += w[3]
    return dist / dist.sum()


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_hybrid_posterior_weights_match_bayes(lam):
    v, mask = 6, 2
    sched = TokenDiffusionScheduler(v, mask, "hybrid", mask_fraction=lam)
    x0_hat = torch.tensor([0.1, 0.3, 0.0, 0.25, 0.05, 0.3], dtype=torch.float64)
    for a_t, a_s in [(0.1, 0.3), (0.5, 0.55), (0.8, 1.0)]:
        for i in range(v):
            if lam == 1.0 and i != mask or lam == 0.0 and i == mask:
                continue  # states the process never visits
            w = sched.hybrid_posterior_weights(x0_hat[i:i + 1], torch.tensor([i == mask]), a_t, a_s)[0]
            torch.testing.assert_close(mixture_from_weights(w, x0_hat, i, mask),
                                       dense_hybrid_posterior(x0_hat, i, a_t, a_s, lam, mask))


@pytest.mark.parametrize("x_t", [2, 4])
def test_hybrid_step_samples_the_posterior(x_t):
    v, mask, rows = 6, 2, 6000
    lam, a_t, a_s = 0.4, 0.3, 0.6
    sched = TokenDiffusionScheduler(v, mask, "hybrid", mask_fraction=lam)
    logits = torch.tensor([0.5, 1.0, 3.0, -0.5, 0.2, 0.8])
    x0_hat = torch.softmax(logits.index_fill(0, torch.tensor([mask]), float("-inf")).double(), -1)
    x = sched.step(logits.expand(rows, 1, v), torch.full((rows, 1), x_t), a_t, a_s, seed=3, offset=0,
                   backend="torch")
    want = dense_hybrid_posterior(x0_hat, x_t, a_t, a_s, lam, mask)
    counts = torch.bincount(x.flatten(), minlength=v).double()
    support = want > 0
    assert counts[~support].sum() == 0
    assert scipy_stats.chisquare(counts[support].numpy(), (want[support] * rows).numpy()).pvalue > 1e-3


def test_first_hitting_time_decreases():
    sched = TokenDiffusionScheduler(11, 10)
    t = torch.ones(4, dtype=torch.float64)
    n = torch.tensor([8, 8, 1, 0])
    for step in range(3):
        new = sched.first_hitting_time(t, n, seed=0, offset=step)
        assert (new[:3] < t[:3]).all() and new[3] == t[3]
        t = new
