"""The hybrid, bd3lm and block_refinement recipes of ``python -m ddiff.train``.

Losses are checked against independent oracles (the discrete-time KL between the true and the
model posteriors, the MDLM / UDLM limits, the diffusers confidence-aware loss restated, the
existing BD3LM path), and each recipe trains a tiny model on ``sorted_digits`` for a few hundred
CPU steps: its sampler's validity must be far above an untrained model's and above the same
model trained with a deliberately wrong loss weighting.
"""

import argparse
import json
import math
import os

import pytest
import torch

import ddiff
from ddiff.pipelines import BlockDiffusionPipeline, TokenDiffusionPipeline
from ddiff.pipelines.token_diffusion_scheduler import TokenDiffusionScheduler
from ddiff.training import (alpha_derivative, bd3lm_loss, block_refinement_loss, block_refinement_masks,
                            confidence_aware_loss, hybrid_integrand, hybrid_loss, is_valid, mdlm_loss,
                            sample_language, udlm_integrand)
from ddiff.training import loop
from ddiff.training.bd3lm import BD3LM, resolve_bd3lm_attention
from ddiff.training.block_refinement import BLOCK_REFINEMENT, causal_lm
from ddiff.training.hybrid import HYBRID

LANG, MASK = "sorted_digits", 10


# ---------------------------------------------------------------------------------------------
# hybrid: the integrand is the continuous-time limit of the per-step posterior KL
# ---------------------------------------------------------------------------------------------


def hybrid_pi(vocab, mask, lam):
    pi = torch.full((vocab,), (1 - lam) / (vocab - 1), dtype=torch.float64)
    pi[mask] = lam
    return pi


def posterior(x0_dist, i, a_t, a_s, pi):
    """q(x_s | x_t = i, x0 ~ x0_dist) ∝ q(x_t = i | x_s) [a_s x0 + (1 - a_s) π], dense float64."""
    v = pi.numel()
    kernel = (a_t / a_s) * torch.eye(v, dtype=torch.float64) + (1 - a_t / a_s) * pi[None, :]
    p = kernel[:, i] * (a_s * x0_dist + (1 - a_s) * pi)
    return p / p.sum()


def kl(p, q):
    support = p > 0
    return float((p[support] * (p[support] / q[support]).log()).sum())


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["log_linear", "cosine"])
@pytest.mark.parametrize("x_t,x0", [(2, 3), (3, 3), (1, 3)])
def test_hybrid_integrand_is_the_limit_of_the_discrete_kl(lam, kind, x_t, x0):
    vocab, mask = 6, 2
    if lam == 0.0 and x_t == mask:
        pytest.skip("λ = 0 never produces the mask")
    x0_hat = torch.tensor([0.1, 0.4, 0.0, 0.2, 0.2, 0.1], dtype=torch.float64)
    pi = hybrid_pi(vocab, mask, lam)
    for t in (0.2, 0.7):
        dt = 1e-6
        a_t, a_s = ddiff.alpha_schedule(t, kind), ddiff.alpha_schedule(t - dt, kind)
        one_hot = torch.nn.functional.one_hot(torch.tensor(x0), vocab).double()
        rate = kl(posterior(one_hot, x_t, a_t, a_s, pi), posterior(x0_hat, x_t, a_t, a_s, pi)) / dt
        got = hybrid_integrand(x0_hat.log()[None, None], torch.tensor([[x0]]), torch.tensor([[x_t]]),
                               torch.tensor([[a_t]], dtype=torch.float64),
                               alpha_derivative(torch.tensor([[t]], dtype=torch.float64), kind),
                               mask_token_id=mask, mask_fraction=lam)
        assert float(got) == pytest.approx(rate, rel=2e-5, abs=1e-7)


def test_hybrid_limits_are_mdlm_and_udlm():
    g = torch.Generator().manual_seed(0)
    vocab, mask, k = 7, 6, 6
    logits = torch.randn(3, 5, vocab, generator=g, dtype=torch.float64)
    logits[..., mask] = -math.inf
    logp = torch.log_softmax(logits, -1)
    x0 = torch.randint(0, k, (3, 5), generator=g)
    alpha = torch.rand(3, 5, generator=g, dtype=torch.float64) * 0.9 + 0.05
    dalpha = -torch.rand(3, 5, generator=g, dtype=torch.float64) - 0.5
    # λ = 1: MDLM, -α'/(1-α) (-log x̂0(x0)) at masks and 0 at real tokens
    x_t = torch.where(torch.rand(3, 5, generator=g) < 0.5, torch.full_like(x0, mask), x0)
    got = hybrid_integrand(logp, x0, x_t, alpha, dalpha, mask_token_id=mask, mask_fraction=1.0)
    nll = -logp.gather(-1, x0[..., None]).squeeze(-1)
    want = torch.where(x_t == mask, -dalpha / (1 - alpha) * nll, torch.zeros_like(nll)).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # λ = 0: UDLM over the K real ids
    x_t = torch.randint(0, k, (3, 5), generator=g)
    got = hybrid_integrand(logp, x0, x_t, alpha, dalpha, mask_token_id=mask, mask_fraction=0.0)
    want = udlm_integrand(logp[..., :k], x0, x_t, alpha, dalpha)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_hybrid_integrand_is_zero_iff_perfect():
    vocab, mask = 6, 5
    x0 = torch.tensor([[0, 3, 4]])
    x_t = torch.tensor([[5, 3, 1]])  # a mask, the clean token, a uniform corruption
    alpha = torch.tensor([[0.3, 0.6, 0.8]], dtype=torch.float64)
    dalpha = torch.full_like(alpha, -1.0)
    perfect = torch.nn.functional.one_hot(x0, vocab).double().clamp_min(1e-30).log()
    assert hybrid_integrand(perfect, x0, x_t, alpha, dalpha, mask_token_id=mask, mask_fraction=0.5).abs().max() < 1e-5
    wrong = torch.log_softmax(torch.randn(1, 3, vocab, dtype=torch.float64), -1)
    assert (hybrid_integrand(wrong, x0, x_t, alpha, dalpha, mask_token_id=mask, mask_fraction=0.5) > 0).all()


class FixedLogits(torch.nn.Module):
    """A 'denoiser' returning fixed logits for any input (it records its inputs)."""

    def __init__(self, logits, attention="bidirectional"):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)
        self.calls = []
        self.config = type("Cfg", (), {"ddiff_attention": attention, "ddiff_block_size": 4})()

    def forward(self, input_ids, **kwargs):
        self.calls.append(dict(input_ids=input_ids, **kwargs))
        b, q = input_ids.shape
        return self.logits[:, :q].expand(b, q, -1)


def test_hybrid_loss_noises_with_the_scheduler_and_sums_the_integrand():
    g = torch.Generator().manual_seed(3)
    vocab, L = 11, 8
    x0 = sample_language(LANG, 16, L, generator=g)
    model = FixedLogits(torch.randn(1, L, vocab, generator=g))
    t = torch.rand(16, generator=g) * 0.9 + 0.05
    out = hybrid_loss(model, x0, t, vocab_size=vocab, mask_token_id=MASK, mask_fraction=0.4, return_output=True,
                      generator=torch.Generator().manual_seed(9))
    sched = TokenDiffusionScheduler(vocab_size=vocab, mask_token_id=MASK, forward_process="hybrid", mask_fraction=0.4)
    assert torch.equal(out.x_t, sched.add_noise(x0, t[:, None].expand(16, L), generator=torch.Generator().manual_seed(9)))
    logits = model.logits.detach().expand(16, L, vocab).clone()
    logits[..., MASK] = -math.inf
    a = sched.alpha(out.t)
    want = hybrid_integrand(torch.log_softmax(logits, -1), x0, out.x_t, a, alpha_derivative(out.t), mask_token_id=MASK,
                            mask_fraction=0.4)
    torch.testing.assert_close(out.token_loss, want)
    assert float(out.loss.detach()) == pytest.approx(float(want.mean()), rel=1e-6)
    out.loss.backward()
    assert torch.isfinite(model.logits.grad).all() and model.logits.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# bd3lm
# ---------------------------------------------------------------------------------------------


def test_bd3lm_dense_loss_is_mdlm_with_blocks():
    from ddiff.denoiser import tiny_denoiser

    torch.manual_seed(0)
    model = tiny_denoiser(11, hidden_size=16, num_layers=1, num_heads=2, attention="block_causal", block_size=4)
    x0 = sample_language(LANG, 6, 12, generator=torch.Generator().manual_seed(1))
    got = bd3lm_loss(model, x0, mask_token_id=MASK, block_size=4, attention="dense", return_output=True,
                     generator=torch.Generator().manual_seed(5))
    want = mdlm_loss(model, x0, mask_token_id=MASK, block_size=4, return_output=True,
                     generator=torch.Generator().manual_seed(5))
    assert torch.equal(got.x_t, want.x_t) and torch.equal(got.t, want.t)
    torch.testing.assert_close(got.token_loss, want.token_loss)
    assert resolve_bd3lm_attention("auto", "cpu") == "dense"
    with pytest.raises(ValueError, match="attention"):
        bd3lm_loss(model, x0, mask_token_id=MASK, block_size=4, attention="sdpa")


@pytest.mark.cuda
def test_bd3lm_flex_loss_equals_dense_on_cuda():
    from ddiff.denoiser import tiny_denoiser

    torch.manual_seed(0)
    dense = tiny_denoiser(11, hidden_size=32, num_layers=2, num_heads=2, attention="block_causal", block_size=4).cuda()
    flex = tiny_denoiser(11, hidden_size=32, num_layers=2, num_heads=2, attention="block_causal", block_size=4,
                         attn_implementation="flex_attention").cuda()
    flex.load_state_dict(dense.state_dict())
    x0 = sample_language(LANG, 8, 16, generator=torch.Generator().manual_seed(1)).cuda()
    kwargs = dict(mask_token_id=MASK, block_size=4, t=torch.rand(8, 4, device="cuda"))
    a = bd3lm_loss(dense, x0, attention="dense", generator=torch.Generator("cuda").manual_seed(2), **kwargs)
    b = bd3lm_loss(flex, x0, attention="flex", generator=torch.Generator("cuda").manual_seed(2), **kwargs)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    b.backward()


# ---------------------------------------------------------------------------------------------
# block refinement (CAP)
# ---------------------------------------------------------------------------------------------


def test_block_refinement_masks():
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(200, 14, dtype=torch.long)
    valid = torch.ones_like(x0, dtype=torch.bool)
    valid[:5, -2:] = False
    masked, masked_rev = block_refinement_masks(x0, prompt_length=3, block_length=4, valid=valid, generator=g)
    assert not masked[:, :3].any() and not masked_rev[:, :3].any()
    assert not (masked & masked_rev).any()
    assert torch.equal(masked | masked_rev, valid & (torch.arange(14) >= 3))
    # one ratio per block and row: the masked fraction of a block is spread over [0, 1]
    frac = masked[:, 3:7].float().mean(1)
    assert frac.min() == 0.0 and frac.max() == 1.0 and 0.35 < float(frac.mean()) < 0.65


def restated_confidence_loss(logits, labels, weights, lam, temp):
    """diffusers' compute_confidence_aware_loss, one position at a time."""
    sft_num = sft_den = conf_num = conf_den = 0.0
    for i in range(labels.numel()):
        z, y, w = logits.reshape(-1, logits.shape[-1])[i].double(), int(labels.reshape(-1)[i]), float(
            weights.reshape(-1)[i])
        sft_num += w * float(-torch.log_softmax(z, -1)[y])
        sft_den += w
        if w and int(z.argmax()) == y:
            p = torch.softmax(z / temp, -1)
            conf_num += w * float(-torch.special.xlogy(p, p).sum())
            conf_den += w
    sft = sft_num / max(1.0, sft_den)
    conf = conf_num / max(1.0, conf_den) if lam != 0 else 0.0  # diffusers skips the term at λ = 0
    return sft + lam * conf, sft, conf


def test_confidence_aware_loss_matches_the_restatement():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 9, generator=g) * 2
    labels = torch.where(torch.rand(3, 7, generator=g) < 0.5, logits.argmax(-1), torch.randint(0, 9, (3, 7), generator=g))
    weights = torch.rand(3, 7, generator=g) < 0.6
    for lam, temp in ((0.0, 1.0), (2.0, 0.5), (1.0, 1.0)):
        got = confidence_aware_loss(logits, labels, weights, lambda_conf=lam, conf_temperature=temp)
        want = restated_confidence_loss(logits, labels, weights, lam, temp)
        for a, b in zip(got, want):
            assert float(a) == pytest.approx(b, rel=1e-5)
    with pytest.raises(ValueError, match="conf_temperature"):
        confidence_aware_loss(logits, labels, weights, conf_temperature=0.0)


def test_block_refinement_loss_runs_two_complementary_samples():
    g = torch.Generator().manual_seed(4)
    L, vocab = 10, 11
    model = FixedLogits(torch.randn(1, L, vocab, generator=g), attention=None)
    x0 = sample_language(LANG, 5, L, generator=g)
    out = block_refinement_loss(model, x0, mask_token_id=MASK, prompt_length=2, block_length=4, lambda_conf=2.0,
                                conf_temperature=0.5, generator=torch.Generator().manual_seed(1), return_output=True)
    assert len(model.calls) == 2
    first, second = (call["input_ids"] for call in model.calls)
    assert torch.equal(first == MASK, out.masked) and torch.equal(second == MASK, out.masked_rev)
    assert torch.equal(out.masked | out.masked_rev, (torch.arange(L) >= 2).expand(5, L))
    logits = model.logits.detach().expand(5, L, vocab).clone()
    logits[..., MASK] = torch.finfo(logits.dtype).min
    want = sum(restated_confidence_loss(logits, x0, m, 2.0, 0.5)[0] for m in (out.masked, out.masked_rev))
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="prompt_length"):
        block_refinement_loss(model, x0, mask_token_id=MASK, prompt_length=L, block_length=4)


# ---------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------

TINY = ["--batch_size", "4", "--seq_len", "8", "--hidden_size", "16", "--num_layers", "1", "--num_heads", "2",
        "--warmup_steps", "1", "--torch_threads", "1"]


@pytest.mark.parametrize("objective,extra", [("hybrid", ["--mask_fraction", "0.3"]), ("bd3lm", ["--block_size", "4"]),
                                             ("block_refinement", ["--prompt_length", "4", "--block_length", "2"])])
def test_entry_point_smoke(tmp_path, objective, extra):
    """Two optimizer steps with gradient accumulation and a checkpoint; the checkpoint decodes."""
    from ddiff.train import main

    out = tmp_path / objective
    assert main([objective, "--output_dir", str(out), "--max_train_steps", "2", "--gradient_accumulation_steps", "2",
                 "--checkpointing_steps", "1", "--log_every", "1", *TINY, *extra]) == 0
    for directory in (out, out / "checkpoint-1"):
        files = set(os.listdir(directory))
        assert {"model.safetensors", "config.json", "scheduler_config.json", "training_args.json"} <= files
    with open(out / "training_args.json") as f:
        assert json.load(f)["objective"] == objective
    if objective == "block_refinement":
        from ddiff.pipelines.block_diffusion_scheduler import BlockDiffusionScheduler

        scheduler = BlockDiffusionScheduler.from_config(out)
        assert scheduler.mask_token_id == MASK
        pipe = BlockDiffusionPipeline.from_pretrained(out, attention="causal", scheduler=scheduler, backend="torch")
        assert pipe.mask_token_id == MASK
        res = pipe(input_ids=torch.zeros(2, 4, dtype=torch.long), max_new_tokens=4, block_length=2,
                   steps_per_block=2, output_type="ids", progress=False, eos_early_stop=False)
        assert res.sequences.shape == (2, 4)
    else:
        pipe = TokenDiffusionPipeline.from_pretrained(out, backend="torch")
        assert pipe.process == ("hybrid" if objective == "hybrid" else "absorbing")
        if objective == "hybrid":
            assert pipe.scheduler.mask_fraction == 0.3
        res = pipe(batch_size=2, seq_len=8, num_inference_steps=2, seed=0, progress=False,
                   **({"block_size": 4} if objective == "bd3lm" else {}))
        assert res.sequences.shape == (2, 8)


def test_help_lists_the_new_objectives():
    from ddiff.train import build_parser

    text = build_parser().format_help()
    for name in ("hybrid", "bd3lm", "block_refinement"):
        assert name in text
    args = build_parser().parse_args(["block_refinement", "--output_dir", "x"])
    assert (args.lambda_conf, args.conf_temperature, args.prompt_length, args.block_length) == (2.0, 0.5, 4, 4)
    assert build_parser().parse_args(["bd3lm", "--output_dir", "x"]).attention == "auto"


# ---------------------------------------------------------------------------------------------
# trained vs untrained vs a deliberately wrong loss weighting
# ---------------------------------------------------------------------------------------------

TRAIN = ["--batch_size", "64", "--hidden_size", "32", "--num_layers", "2", "--num_heads", "2", "--warmup_steps", "20",
         "--learning_rate", "3e-3", "--log_every", "0", "--torch_threads", "1", "--seed", "0"]


def train(recipe, directory, steps, seq_len, extra=(), wrong_loss=None):
    parser = argparse.ArgumentParser()
    loop.add_common_arguments(parser)
    recipe.add_arguments(parser)
    args = parser.parse_args(["--output_dir", str(directory), "--max_train_steps", str(steps), "--seq_len",
                              str(seq_len), *TRAIN, *extra])
    args.objective = recipe.name
    if wrong_loss is not None:
        base = recipe

        def setup(a, accelerator):
            s = base.setup(a, accelerator)
            s.loss = wrong_loss(a)
            return s

        recipe = loop.Recipe(base.name, base.help, base.add_arguments, setup)
    assert loop.run(recipe, args) == 0
    return directory


def token_validity(pipe, seq_len, **kwargs):
    out = pipe(batch_size=128, seq_len=seq_len, num_inference_steps=32, seed=0, output_type="ids", progress=False,
               **kwargs)
    return float(is_valid(LANG, out.sequences).float().mean())


def untrained_copy(directory, block_size=None):
    """The same architecture, freshly initialised."""
    pipe = TokenDiffusionPipeline.from_pretrained(directory, backend="torch")
    torch.manual_seed(0)
    pipe.model = type(pipe.model)(pipe.model.config).eval()
    return pipe


def test_hybrid_training_beats_untrained_and_the_absorbing_weighting(tmp_path):
    """Wrong weighting: the hybrid ELBO with the uniform-corruption term dropped (weight 0 at real
    x_t, as if the process were absorbing): the model never learns to repair uniform noise."""
    def absorbing_weighting(args):
        def loss(model, x0):
            out = hybrid_loss(model, x0, vocab_size=11, mask_token_id=MASK, mask_fraction=args.mask_fraction,
                              t_min=args.t_min, return_output=True)
            return (out.token_loss * (out.x_t == MASK)).mean()
        return loss

    right = train(HYBRID, tmp_path / "right", 400, 8)
    wrong = train(HYBRID, tmp_path / "wrong", 400, 8, wrong_loss=absorbing_weighting)
    trained = token_validity(TokenDiffusionPipeline.from_pretrained(right, backend="torch"), 8)
    untrained = token_validity(untrained_copy(right), 8)
    mis = token_validity(TokenDiffusionPipeline.from_pretrained(wrong, backend="torch"), 8)
    assert trained >= 0.2 and trained >= untrained + 0.15 and trained >= mis + 0.1, (trained, untrained, mis)


def test_bd3lm_training_beats_untrained_and_a_low_noise_only_weighting(tmp_path):
    """Wrong weighting: the NELBO weight kept only for t < 0.15, so the states each block starts
    from (mostly masks) are never trained."""
    def low_noise_only(args):
        def loss(model, x0):
            out = bd3lm_loss(model, x0, mask_token_id=MASK, block_size=args.block_size, attention="dense",
                             t_min=args.t_min, return_output=True)
            return (out.token_loss * (out.t < 0.15)).mean()
        return loss

    extra = ["--block_size", "4", "--attention", "dense"]
    right = train(BD3LM, tmp_path / "right", 400, 8, extra)
    wrong = train(BD3LM, tmp_path / "wrong", 400, 8, extra, wrong_loss=low_noise_only)
    trained = token_validity(TokenDiffusionPipeline.from_pretrained(right, backend="torch"), 8, block_size=4)
    untrained = token_validity(untrained_copy(right), 8, block_size=4)
    mis = token_validity(TokenDiffusionPipeline.from_pretrained(wrong, backend="torch"), 8, block_size=4)
    assert trained >= 0.2 and trained >= untrained + 0.15 and trained >= mis + 0.1, (trained, untrained, mis)


def test_block_refinement_training_beats_untrained_and_a_flipped_confidence_weight(tmp_path):
    """Decoded with BlockDiffusionPipeline(attention="causal") at temperature 1, so the learned
    distribution (not only its argmax) matters. Wrong weighting: the confidence term's weight
    negated (-λ_conf), which rewards entropy on correct predictions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def flipped_confidence(args):
        def loss(model, x0):
            return block_refinement_loss(model, x0, mask_token_id=MASK, prompt_length=args.prompt_length,
                                         block_length=args.block_length, lambda_conf=-args.lambda_conf,
                                         conf_temperature=args.conf_temperature)
        return loss

    seq_len, prompt_len = 12, 4
    extra = ["--prompt_length", str(prompt_len), "--block_length", "4"]
    right = train(BLOCK_REFINEMENT, tmp_path / "right", 200, seq_len, extra)
    wrong = train(BLOCK_REFINEMENT, tmp_path / "wrong", 200, seq_len, extra, wrong_loss=flipped_confidence)
    prompts = sample_language(LANG, 128, seq_len, generator=torch.Generator().manual_seed(5))[:, :prompt_len]

    def validity(model):
        pipe = BlockDiffusionPipeline(model.eval(), AutoTokenizer.from_pretrained(right), attention="causal",
                                      mask_token_id=MASK, backend="torch")
        out = pipe(input_ids=prompts, max_new_tokens=seq_len - prompt_len, block_length=4, steps_per_block=4,
                   temperature=1.0, seed=0, output_type="ids", progress=False, eos_early_stop=False)
        return float(is_valid(LANG, torch.cat([prompts, out.sequences], 1)).float().mean())

    trained = validity(AutoModelForCausalLM.from_pretrained(right))
    torch.manual_seed(0)
    untrained = validity(causal_lm(11, hidden_size=32, num_layers=2, num_heads=2))
    mis = validity(AutoModelForCausalLM.from_pretrained(wrong))
    assert trained >= 0.5 and trained >= untrained + 0.3 and trained >= mis + 0.3, (trained, untrained, mis)
