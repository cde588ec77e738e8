"""ddiff.training: BD3LM mask, schedule derivatives, MDLM / UDLM losses against discrete-time KLs,
synthetic languages, and a smoke run of the ``python -m ddiff.train`` entry point."""

import json
import math
import os

import pytest
import torch

import ddiff
from ddiff.training import (alpha_derivative, block_diffusion_mask, is_valid, mdlm_loss, sample_language,
                            udlm_integrand, udlm_loss)

KINDS = ["log_linear", "linear", "cosine", "geometric"]


# ---------------------------------------------------------------------------------------------
# block_diffusion_mask
# ---------------------------------------------------------------------------------------------


def brute_force_bd3lm_mask(n, bs):
    """Rule by rule, with Python ints: x_t = [0, n), x_0 = [n, 2n)."""
    out = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for q in range(2 * n):
        for k in range(2 * n):
            q_clean, k_clean = q >= n, k >= n
            qb, kb = (q % n) // bs, (k % n) // bs
            if not q_clean and not k_clean:
                out[q, k] = qb == kb
            elif not q_clean and k_clean:
                out[q, k] = kb < qb
            elif q_clean and k_clean:
                out[q, k] = kb <= qb
    return out


@pytest.mark.parametrize("n,bs", [(8, 2), (12, 4), (10, 4), (6, 6), (5, 1)])
def test_block_diffusion_mask_dense(n, bs):
    mask = block_diffusion_mask(n, bs)
    assert mask.dense.shape == (2 * n, 2 * n) and mask.dense.dtype == torch.bool
    assert torch.equal(mask.dense, brute_force_bd3lm_mask(n, bs))
    mask_mod, dense = mask  # unpacks
    assert dense is mask.dense and callable(mask_mod)


def test_block_diffusion_mask_mod_with_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    n, bs = 16, 4
    mask = block_diffusion_mask(n, bs)
    got = flex.create_mask(mask.mask_mod, None, None, 2 * n, 2 * n, device="cpu")
    assert torch.equal(got[0, 0], mask.dense)


def test_block_diffusion_mask_full_block_is_mdlm():
    dense = block_diffusion_mask(6, 6).dense
    assert dense[:6, :6].all() and not dense[:6, 6:].any() and not dense[6:, :6].any()


@pytest.mark.parametrize("args", [(0, 2), (4, 0), (4.0, 2), (4, True)])
def test_block_diffusion_mask_bad_args(args):
    with pytest.raises(ValueError):
        block_diffusion_mask(*args)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_derivative_matches_finite_differences(kind):
    t = torch.linspace(0.01, 0.99, 41, dtype=torch.float64)
    h = 1e-6
    numeric = (ddiff.alpha_schedule(t + h, kind) - ddiff.alpha_schedule(t - h, kind)) / (2 * h)
    torch.testing.assert_close(alpha_derivative(t, kind), numeric, rtol=1e-5, atol=1e-7)
    assert (alpha_derivative(t, kind) <= 0).all()


# ---------------------------------------------------------------------------------------------
# Losses against the discrete-time KL of the true and model posteriors (dense, float64)
# ---------------------------------------------------------------------------------------------


def forward_kernel(alpha, pi):
    """[V, V] q(x_t = i | x_s = j) = alpha δ_ij + (1 - alpha) π_i, indexed [j, i]."""
    v = pi.numel()
    return alpha * torch.eye(v, dtype=torch.float64) + (1 - alpha) * pi[None, :]


def plug_in_posterior(x0_dist, i, alpha_t, alpha_s, pi):
    """q(x_s | x_t = i, x̂0) ∝ q(x_t = i | x_s) [α_s x̂0 + (1 - α_s) π] (D3PM's interpolating family)."""
    q_xs = alpha_s * x0_dist + (1 - alpha_s) * pi
    lik = forward_kernel(alpha_t / alpha_s, pi)[:, i]
    post = lik * q_xs
    return post / post.sum()


def kl(p, q):
    support = p > 0
    return float((p[support] * (p[support] / q[support]).log()).sum())


class FixedLogits(torch.nn.Module):
    """A 'denoiser' that returns the same logits for every input (records its inputs)."""

    def __init__(self, logits, attention=None):
        super().__init__()
        self.logits = logits
        self.calls = []
        self.config = type("Cfg", (), {"ddiff_attention": attention, "ddiff_block_size": 4 if attention else None})()

    def forward(self, input_ids, **kwargs):
        self.calls.append(dict(input_ids=input_ids, **kwargs))
        b, q = input_ids.shape
        return self.logits[:, :q].expand(b, q, -1)


@pytest.mark.parametrize("kind", ["log_linear", "cosine"])
def test_mdlm_weight_is_the_limit_of_the_discrete_kl(kind):
    """T · KL(q(x_s|x_t=mask, x0) ‖ q(x_s|x_t=mask, x̂0)) -> -α'/(1-α) · (-log x̂0(x0))."""
    v, mask = 6, 5
    x0_hat = torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1, 0.0], dtype=torch.float64)
    pi = torch.zeros(v, dtype=torch.float64)
    pi[mask] = 1.0
    for t in (0.2, 0.7):
        dt = 1e-5
        a_t, a_s = ddiff.alpha_schedule(t, kind), ddiff.alpha_schedule(t - dt, kind)
        one_hot = torch.nn.functional.one_hot(torch.tensor(2), v).double()
        rate = kl(plug_in_posterior(one_hot, mask, a_t, a_s, pi), plug_in_posterior(x0_hat, mask, a_t, a_s, pi)) / dt
        weight = -float(alpha_derivative(torch.tensor(t, dtype=torch.float64), kind)) / (1 - a_t)
        assert rate == pytest.approx(weight * -math.log(0.2), rel=1e-3)


@pytest.mark.parametrize("kind", ["log_linear", "geometric"])
@pytest.mark.parametrize("x_t,x0", [(1, 1), (1, 3), (0, 3)])
def test_udlm_integrand_is_the_limit_of_the_discrete_kl(kind, x_t, x0):
    n = 5
    x0_hat = torch.tensor([0.05, 0.5, 0.15, 0.2, 0.1], dtype=torch.float64)
    pi = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        dt = 1e-6
        a_t, a_s = ddiff.alpha_schedule(t, kind), ddiff.alpha_schedule(t - dt, kind)
        one_hot = torch.nn.functional.one_hot(torch.tensor(x0), n).double()
        rate = kl(plug_in_posterior(one_hot, x_t, a_t, a_s, pi), plug_in_posterior(x0_hat, x_t, a_t, a_s, pi)) / dt
        got = udlm_integrand(x0_hat.log()[None, None], torch.tensor([[x0]]), torch.tensor([[x_t]]),
                             torch.tensor([[a_t]], dtype=torch.float64),
                             alpha_derivative(torch.tensor([[t]], dtype=torch.float64), kind))
        assert float(got) == pytest.approx(rate, rel=2e-3, abs=1e-6)


def test_udlm_integrand_zero_iff_perfect():
    n = 6
    x0 = torch.tensor([[2, 4]])
    x_t = torch.tensor([[2, 1]])
    alpha = torch.tensor([[0.3, 0.6]], dtype=torch.float64)
    dalpha = torch.full_like(alpha, -1.0)
    perfect = torch.nn.functional.one_hot(x0, n).double().clamp_min(1e-30).log()
    assert udlm_integrand(perfect, x0, x_t, alpha, dalpha).abs().max() < 1e-6
    wrong = torch.log_softmax(torch.randn(1, 2, n, dtype=torch.float64), -1)
    assert (udlm_integrand(wrong, x0, x_t, alpha, dalpha) > 0).all()


def test_mdlm_loss_token_values():
    torch.manual_seed(0)
    b, L, v, mask = 3, 8, 7, 6
    logits = torch.randn(1, L, v)
    model = FixedLogits(logits)
    x0 = torch.randint(0, mask, (b, L))
    t = torch.tensor([0.2, 0.5, 0.9])
    out = mdlm_loss(model, x0, t, mask_token_id=mask, return_output=True, generator=torch.Generator().manual_seed(1))
    masked = out.x_t == mask
    assert masked.any() and (~masked).any()
    assert ((out.x_t == x0) | masked).all()
    logp = torch.log_softmax(logits[0, :, :mask], -1).expand(b, L, mask)
    nll = -logp.gather(-1, x0[..., None]).squeeze(-1)
    want = torch.where(masked, nll / t[:, None], torch.zeros(()))  # log-linear: -α'/(1-α) = 1/t
    torch.testing.assert_close(out.token_loss, want, rtol=1e-5, atol=1e-6)
    assert float(out.loss) == pytest.approx(float(want.mean()), rel=1e-5)


def test_mdlm_loss_block_mode_feeds_xt_and_x0_under_the_bd3lm_mask():
    b, L, v, mask, bs = 2, 8, 5, 4, 4
    model = FixedLogits(torch.zeros(1, 2 * L, v), attention="block_causal")
    x0 = torch.randint(0, mask, (b, L))
    t = torch.tensor([[0.3, 0.8], [0.5, 0.6]])
    out = mdlm_loss(model, x0, t, mask_token_id=mask, block_size=bs, return_output=True)
    call = model.calls[-1]
    assert torch.equal(call["input_ids"][:, L:], x0) and torch.equal(call["input_ids"][:, :L], out.x_t)
    assert torch.equal(call["attention_mask"][0, 0], block_diffusion_mask(L, bs).dense)
    assert torch.equal(call["position_ids"][0], torch.arange(L).repeat(2))
    assert torch.equal(out.t, t.repeat_interleave(bs, 1))


def test_udlm_loss_runs_and_excludes_mask_from_noise():
    torch.manual_seed(0)
    v, mask = 7, 6
    model = FixedLogits(torch.randn(1, 8, v))
    x0 = torch.randint(0, mask, (64, 8))
    out = udlm_loss(model, x0, vocab_size=v, mask_token_id=mask, return_output=True)
    assert (out.x_t != mask).all() and torch.isfinite(out.loss) and out.loss > 0
    with pytest.raises(ValueError, match="vocab_size - 1"):
        udlm_loss(model, x0, vocab_size=v, mask_token_id=2)


# ---------------------------------------------------------------------------------------------
# Languages and the entry point
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,seq_len", [("sorted_digits", 16), ("brackets", 12)])
def test_languages(name, seq_len):
    g = torch.Generator().manual_seed(0)
    x = sample_language(name, 500, seq_len, generator=g)
    assert is_valid(name, x).all()
    noise = torch.randint(0, 2 if name == "brackets" else 10, (500, seq_len), generator=g)
    assert is_valid(name, noise).float().mean() < 0.05


def test_train_entry_point_smoke(tmp_path):
    """Two optimizer steps of ``python -m ddiff.train`` (run in-process), with accumulation and a checkpoint."""
    from ddiff.pipelines import TokenDiffusionPipeline
    from ddiff.train import build_parser, main

    for objective in ("mdlm", "udlm"):
        parsed = build_parser().parse_args([objective, "--output_dir", "x"])
        assert parsed.objective == objective and parsed.mixed_precision == "no"
    out = tmp_path / "run"
    args = ["udlm", "--output_dir", str(out), "--max_train_steps", "2", "--batch_size", "4", "--seq_len", "8",
            "--hidden_size", "16", "--num_layers", "1", "--num_heads", "2", "--gradient_accumulation_steps", "2",
            "--checkpointing_steps", "1", "--log_every", "1", "--warmup_steps", "1", "--torch_threads", "1"]
    assert main(args) == 0
    for directory in (out, out / "checkpoint-1"):
        files = set(os.listdir(directory))
        assert {"model.safetensors", "config.json", "scheduler_config.json", "training_args.json"} <= files
    with open(out / "scheduler_config.json") as f:
        assert json.load(f)["forward_process"] == "uniform"
    pipe = TokenDiffusionPipeline.from_pretrained(out, backend="torch")
    assert pipe.process == "uniform" and pipe.mask_token_id == 10
    res = pipe(batch_size=2, seq_len=8, num_inference_steps=2, seed=0, progress=False)
    assert res.sequences.shape == (2, 8) and len(res.texts) == 2


def test_train_help_lists_both_objectives():
    from ddiff.train import build_parser

    text = build_parser().format_help()
    assert "mdlm" in text and "udlm" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sedd", "--output_dir", "x"])
