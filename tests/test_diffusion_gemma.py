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


# ----------------------------------------------------------------------------------------
# the step on given logits
# ----------------------------------------------------------------------------------------
dg = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")
from ddiff.integrations import diffusion_gemma as ddg  # noqa: E402


def transformers_accept(processed, bound):
    B, L, V = processed.shape
    sampler = dg.EntropyBoundSampler(dg.EntropyBoundSamplerConfig(entropy_bound=bound), L, V, 1)
    canvas = torch.zeros(B, L, dtype=torch.long)
    sampler.accept_canvas(canvas, canvas + 1, processed, 1)
    return sampler.accepted_token_mask


@pytest.mark.parametrize("cur_step,steps", [(48, 48), (17, 48), (1, 48), (3, 7)])
def test_linear_temperature_is_transformers_bit_for_bit(cur_step, steps):
    logits = torch.randn(2, 5, 33) * 10
    proc = dg.LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=steps)
    want = proc(None, logits, cur_step=torch.tensor(cur_step, dtype=torch.int32))
    temperature = ddg.linear_temperature(cur_step, 0.4, 0.8, steps)
    assert temperature.dtype == torch.float32 and temperature.dim() == 0
    assert torch.equal(logits.clone().div_(temperature), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_accepts_what_transformers_accepts_and_renoises_the_rest(backend):
    g = torch.Generator().manual_seed(3)
    processed = torch.randn(2, 12, 48, generator=g) * 3
    for bound in (0.1, 2.0) if backend == "torch" else (0.7,):
        out = ddg.entropy_bound_step(processed, entropy_bound=bound, seed=9, offset=4, backend=backend)
        assert torch.equal(out.accepted, transformers_accept(processed, bound))
        assert torch.equal(out.canvas[out.accepted], out.tokens[out.accepted])
        fresh = ddiff.renoise_uniform(out.tokens, out.accepted, vocab_size=48, seed=9, offset=4)
        assert torch.equal(out.canvas, fresh)
        assert torch.equal(out.argmax, processed.argmax(-1))
        torch.testing.assert_close(out.entropy, torch.distributions.Categorical(logits=processed).entropy(),
                                   rtol=1e-5, atol=1e-5)
    greedy = ddg.entropy_bound_step(processed, entropy_bound=0.5, do_sample=False, seed=0, backend=backend)
    assert torch.equal(greedy.tokens, processed.argmax(-1))


def test_sampled_canvas_follows_the_tempered_softmax():
    """Chi-square: every position of a [1, N, V] canvas with the same logits row is an
    independent draw; accepted positions follow softmax(logits / T). (The Triton path draws
    the same integers: ``test_step_backends_agree``.)"""
    backend = "torch"
    vocab, n = 6, 3000
    row = torch.tensor([2.0, 0.5, -1.0, 1.5, 0.0, -3.0])
    logits = row.expand(1, n, vocab).contiguous()
    temperature = 0.7
    out = ddg.entropy_bound_step(logits, entropy_bound=1e9, temperature=temperature, seed=21, offset=2,
                                 backend=backend)
    assert out.accepted.all()
    counts = torch.bincount(out.canvas.flatten(), minlength=vocab).double()
    expected = torch.softmax(row.double() / temperature, -1) * n
    assert scipy_stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-4
    rejected = ddg.entropy_bound_step(logits, entropy_bound=0.0, temperature=temperature, seed=21, offset=2,
                                      backend=backend)
    assert rejected.accepted.sum() == 1  # ties: the lowest position only
    fresh = torch.bincount(rejected.canvas[~rejected.accepted], minlength=vocab).double()
    assert scipy_stats.chisquare(fresh.numpy()).pvalue > 1e-4


def test_step_backends_agree():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 8, 40, generator=g) * 2
    torch_out = ddg.entropy_bound_step(logits, entropy_bound=0.8, temperature=0.6, seed=3, offset=1, backend="torch")
    triton_out = ddg.entropy_bound_step(logits, entropy_bound=0.8, temperature=0.6, seed=3, offset=1,
                                        backend="triton")
    for name in ("canvas", "tokens", "argmax", "accepted"):
        assert torch.equal(getattr(torch_out, name), getattr(triton_out, name)), name
    torch.testing.assert_close(torch_out.entropy, triton_out.entropy, rtol=1e-5, atol=1e-6)


def test_stopping_decision_equals_transformers():
    """The same sequence of (argmax, logits) through transformers' criteria and ddiff's rule."""
    g = torch.Generator().manual_seed(8)
    for threshold, stability in ((0.5, 2), (3.0, 1), (3.0, 0), (1e-3, 1)):
        criteria = dg.StableAndConfidentStoppingCriteria(stability_threshold=stability, confidence_threshold=threshold)
        history = None
        fixed = torch.randint(0, 20, (3, 10), generator=g)
        for step in range(6):
            logits = torch.randn(3, 10, 20, generator=g) * (1 + 3 * step)
            argmax = torch.where(torch.rand(3, 1, generator=g) < 0.7, fixed, torch.randint(0, 20, (3, 10), generator=g))
            want = criteria(argmax, logits)
            _, neg_entropy = ddiff.predict_tokens(logits, confidence="neg_entropy", confidence_from="sampling")
            got, history = ddg.stable_and_confident(history, argmax, -neg_entropy, stability_threshold=stability,
                                                    confidence_threshold=threshold)
            assert torch.equal(got, want), (threshold, stability, step)


# ----------------------------------------------------------------------------------------
# the full generate loop on a tiny random DiffusionGemmaForBlockDiffusion
# ----------------------------------------------------------------------------------------
SEED = 1234


def tiny_diffusion_gemma(canvas_length=8, vocab=96):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, Gemma4VisionConfig
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig

    text = DiffusionGemmaTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=16, sliding_window=8, max_position_embeddings=256,
        num_experts=2, top_k_experts=1, moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"])
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                                num_key_value_heads=1, head_dim=16, position_embedding_size=16)
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length)
    torch.manual_seed(0)
    return DiffusionGemmaForBlockDiffusion(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_diffusion_gemma()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))


def transformers_generate_deterministic(model, input_ids, seed=SEED, **kwargs):
    """transformers' own generate with its two random sources pinned: ``torch.multinomial``
    becomes the argmax and every ``initialize_canvas`` (first canvas, each renoising) draws
    ddiff's uniform tokens at the offsets ddiff's sampler uses (one per draw, in order)."""
    from unittest import mock

    counter = [0]

    def initialize_canvas(self, batch_size, device):
        canvas = ddiff.renoise_uniform(torch.empty(batch_size, self.canvas_length, dtype=torch.long, device=device),
                                       vocab_size=self.vocab_size, seed=seed, offset=counter[0])
        counter[0] += 1
        return canvas

    steps = []
    real_step = dg.DiffusionGemmaGenerationMixin._denoising_step

    def counting_step(self, *args, **kw):
        steps.append(kw["cur_step"])
        return real_step(self, *args, **kw)

    with mock.patch.object(dg.EntropyBoundSampler, "initialize_canvas", initialize_canvas), \
            mock.patch.object(torch, "multinomial", lambda probs, num_samples: probs.argmax(-1, keepdim=True)), \
            mock.patch.object(dg.DiffusionGemmaGenerationMixin, "_denoising_step", counting_step):
        out = model.generate(input_ids, **kwargs)
    return out, steps


def ddiff_generate_counting(model, input_ids, **kwargs):
    from unittest import mock

    steps = []
    real_step = ddg._ddiff_denoising_step

    def counting_step(self, *args, **kw):
        steps.append(kw["cur_step"])
        return real_step(self, *args, **kw)

    with mock.patch.object(ddg, "_ddiff_denoising_step", counting_step):
        out = ddg.generate(model, input_ids, **kwargs)
    return out, steps


GENERATE_CASES = {
    # rows stop at different steps (all accepted, always confident: stops once the argmax repeats)
    "early_stop": dict(max_new_tokens=16, max_denoising_steps=20, entropy_bound=100.0, confidence_threshold=10.0,
                       stability_threshold=1),
    "stability_2": dict(max_new_tokens=16, max_denoising_steps=20, entropy_bound=100.0, confidence_threshold=10.0,
                        stability_threshold=2),
    # the defaults' bound: one or two tokens accepted per step, every step runs
    "defaults": dict(max_new_tokens=8, max_denoising_steps=6, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                     stability_threshold=1, confidence_threshold=0.005),
    "mid_bound": dict(max_new_tokens=8, max_denoising_steps=8, entropy_bound=3.0, t_min=0.2, t_max=1.5,
                      confidence_threshold=4.0, stability_threshold=1),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_matches_transformers_token_for_token(model, prompt, case):
    kwargs = dict(GENERATE_CASES[case])
    bound = kwargs.pop("entropy_bound")
    want, want_steps = transformers_generate_deterministic(
        model, prompt, sampler_config=dg.EntropyBoundSamplerConfig(entropy_bound=bound), **kwargs)
    got, got_steps = ddiff_generate_counting(model, prompt, entropy_bound=bound, seed=SEED, do_sample=False,
                                             backend="torch", **kwargs)
    assert got_steps == want_steps  # the same denoising steps ran (the stopping step included)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(got.tokens_per_forward, want.tokens_per_forward)
    if case == "early_stop":
        assert len(want_steps) < 2 * 20 and len(set(want.tokens_per_forward.tolist())) == 2  # rows stop apart


def test_generate_with_a_user_logits_processor_matches_transformers(model, prompt):
    from transformers import LogitsProcessorList, TopKLogitsWarper

    kwargs = dict(max_new_tokens=8, max_denoising_steps=5, confidence_threshold=10.0, stability_threshold=1)
    bound = dg.EntropyBoundSamplerConfig(entropy_bound=1.0)
    want, want_steps = transformers_generate_deterministic(
        model, prompt, sampler_config=bound, logits_processor=LogitsProcessorList([TopKLogitsWarper(5)]), **kwargs)
    got, got_steps = ddiff_generate_counting(
        model, prompt, sampler_config=bound, logits_processor=LogitsProcessorList([TopKLogitsWarper(5)]), seed=SEED,
        do_sample=False, backend="torch", **kwargs)
    assert got_steps == want_steps and torch.equal(got.sequences, want.sequences)


def test_generate_bf16_model_matches_transformers(model, prompt):
    import copy

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    kwargs = dict(max_new_tokens=8, max_denoising_steps=5, entropy_bound=100.0, confidence_threshold=10.0,
                  stability_threshold=1)
    bound = kwargs.pop("entropy_bound")
    want, want_steps = transformers_generate_deterministic(
        bf16, prompt, sampler_config=dg.EntropyBoundSamplerConfig(entropy_bound=bound), **kwargs)
    got, got_steps = ddiff_generate_counting(bf16, prompt, entropy_bound=bound, seed=SEED, do_sample=False,
                                             backend="torch", **kwargs)
    assert got_steps == want_steps and torch.equal(got.sequences, want.sequences)


def test_generate_runs_end_to_end_on_triton():
    """Kept tiny: the Triton interpreter runs the fused row kernel on CPU. (Sampling on Triton
    draws what the torch backend draws: ``test_step_backends_agree``.)"""
    small = tiny_diffusion_gemma(canvas_length=4)
    ids = torch.randint(3, 96, (1, 3), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=4, max_denoising_steps=3, entropy_bound=0.5, confidence_threshold=10.0,
                  stability_threshold=1)
    bound = kwargs.pop("entropy_bound")
    want, want_steps = transformers_generate_deterministic(
        small, ids, sampler_config=dg.EntropyBoundSamplerConfig(entropy_bound=bound), **kwargs)
    got, got_steps = ddiff_generate_counting(small, ids, entropy_bound=bound, seed=SEED, do_sample=False,
                                             backend="triton", **kwargs)
    assert got_steps == want_steps and torch.equal(got.sequences, want.sequences)


def test_generate_samples_reproducibly(model, prompt):
    kwargs = dict(max_new_tokens=8, max_denoising_steps=2, entropy_bound=0.5)
    a = ddg.generate(model, prompt, seed=5, backend="torch", **kwargs)
    b = ddg.generate(model, prompt, seed=5, backend="torch", **kwargs)
    c = ddg.generate(model, prompt, seed=6, backend="torch", **kwargs)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    assert a.sequences.shape == (2, 5 + 8) and torch.equal(a.sequences[:, :5], prompt)
    torch.manual_seed(3)
    d = ddg.generate(model, prompt, backend="torch", **kwargs)
    torch.manual_seed(3)
    assert torch.equal(d.sequences, ddg.generate(model, prompt, backend="torch", **kwargs).sequences)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(ddg.generate(model, prompt, generator=g1, backend="torch", **kwargs).sequences,
                       ddg.generate(model, prompt, generator=g2, backend="torch", **kwargs).sequences)


def test_generate_restores_the_model(model, prompt):
    ddg.generate(model, prompt, max_new_tokens=8, max_denoising_steps=2, seed=0, backend="torch")
    for name in ("_prepare_sampler", "_denoising_step"):
        assert name not in vars(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ddg.use_ddiff(model, seed=0):
            raise RuntimeError("boom")
    assert "_denoising_step" not in vars(model)
    # the unpatched model still runs transformers' own step
    out = model.generate(prompt, max_new_tokens=8, max_denoising_steps=2)
    assert out.sequences.shape == (2, 13)


def test_nan_logits_raise(model, prompt):
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.decoder.norm.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        ddg.generate(broken, prompt, max_new_tokens=8, max_denoising_steps=3, seed=0, backend="torch")


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(entropy_bound=0.1, sampler_config=None), ValueError, "sampler_config"),
    (dict(entropy_bound=-1.0), ValueError, "entropy_bound"),
    (dict(do_sample=1), TypeError, "do_sample"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "seed"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_generate_bad_arguments(model, prompt, kwargs, err, match):
    with pytest.raises(err, match=match):
        ddg.generate(model, prompt, max_new_tokens=8, max_denoising_steps=2, **kwargs)


def test_generate_needs_a_diffusion_gemma_model(prompt):
    with pytest.raises(TypeError, match="DiffusionGemma"):
        ddg.generate(torch.nn.Linear(2, 2), prompt)


def test_step_divides_the_model_logits_in_place(model, prompt, monkeypatch):
    """The processed logits are the model's own output buffer (no [B, L, V] copy for the
    temperature), and they are what the next step gets as self-conditioning input."""
    outputs, step_inputs, sc_inputs = [], [], []
    real_forward = model.forward

    def forward(*args, **kwargs):
        if kwargs.get("decoder_input_ids") is not None:
            sc_inputs.append(kwargs.get("self_conditioning_logits"))
        out = real_forward(*args, **kwargs)
        outputs.append(out.logits.data_ptr())
        return out

    real_step = ddg.entropy_bound_step

    def step(logits, **kwargs):
        step_inputs.append(logits.data_ptr())
        return real_step(logits, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(ddg, "entropy_bound_step", step)
    ddg.generate(model, prompt, max_new_tokens=8, max_denoising_steps=3, seed=0, backend="torch")
    decoder_outputs = outputs[-3:]  # the three decoder calls (the encoder prefill comes first)
    assert step_inputs == decoder_outputs
    assert sc_inputs[0] is None and [t.data_ptr() for t in sc_inputs[1:]] == decoder_outputs[:2]
