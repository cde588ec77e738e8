"""BlockDiffusionPipeline against the published decoding loops, token for token.

Each upstream loop is restated in tests/upstream/ (LLaDA ``generate``, Fast-dLLM threshold and
factor, Dream ``diffusion_generate`` for every ``alg`` and ``alg_temp``, SDAR static / dynamic /
sequential, LLaDA2.0 and the LLaDA2.1 editing loop) and run on the same tiny random Qwen3 at
temperature 0; seeded cases feed the restated loop ddiff's Philox draws. The small-vocabulary
models predict the mask id now and then, which the published loops do not suppress: the
pipeline must then do what they do (keep the position masked, and in LLaDA's bidirectional
loop, let it compete again in later blocks).
"""

import pytest
import torch
from upstream import dream, fast_dllm, llada, llada2, sdar
from upstream.harness import (LLaDASignature, block_causal, dream_alg_temp, dream_coin, full_attention, llada_noise,
                              random_qwen3)

from ddiff.pipelines import BlockDiffusionPipeline
from ddiff.pipelines.presets import get_preset

MASK = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tokens_after(x, prompt_len, length=None):
    return x[:, prompt_len:prompt_len + length if length else None].tolist()


def prompt_for(vocab, length, *avoid):
    ids = (torch.arange(length)[None] * 7 + 1) % vocab
    for token in (MASK, *avoid):
        ids[ids == token] = 0
    return ids


# ---------------------------------------------------------------------------------------------
# LLaDA generate
# ---------------------------------------------------------------------------------------------
# (seed, vocab): vocab-12 models predict the mask id; with these seeds LLaDA ends with 8, 6 and
# 2 masks left over (its fixed schedule spends a step's count on them)
LLADA_MODELS = [(0, 32), (5, 12), (14, 12), (25, 12)]


@pytest.mark.parametrize("seed, vocab", LLADA_MODELS)
def test_llada_generate_with_the_mask_id_allowed(seed, vocab):
    model = LLaDASignature(random_qwen3(seed, vocab=vocab, std=0.5))
    prompt = prompt_for(vocab, 6)
    want = llada.generate(model, prompt, steps=8, gen_length=16, block_length=8, mask_id=MASK)
    pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention_mask_format="2d", backend="torch")
    out = pipe(input_ids=prompt, max_new_tokens=16, block_length=8, steps_per_block=4, eos_early_stop=False,
               progress=False)
    assert out.sequences.tolist() == tokens_after(want, 6)
    assert out.nfe == 8
    if vocab == 12:
        assert (out.sequences == MASK).any()  # the case this test is about
        suppressed = pipe(input_ids=prompt, max_new_tokens=16, block_length=8, steps_per_block=4,
                          suppress_tokens=[MASK], eos_early_stop=False, progress=False)
        assert not (suppressed.sequences == MASK).any()


def test_llada_generate_padded_batch_with_the_mask_id_allowed():
    model = LLaDASignature(random_qwen3(24, vocab=12, std=0.5))
    prompt = torch.tensor([[0, 0, 1, 9, 10, 2], [1, 7, 5, 11, 8, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    want = llada.generate(model, prompt, mask, steps=8, gen_length=16, block_length=4, mask_id=MASK)
    pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention_mask_format="2d", backend="torch")
    out = pipe(input_ids=prompt, attention_mask=mask, max_new_tokens=16, block_length=4, steps_per_block=2,
               eos_early_stop=False, progress=False)
    assert out.sequences.tolist() == tokens_after(want, 6)


class Boost(torch.nn.Module):
    """Raises some token's logits so that EOS / EOT get predicted."""

    def __init__(self, model, ids, amount):
        super().__init__()
        self.model, self.ids, self.amount = model, ids, amount

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, attention_mask=None):
        out = self.model(input_ids, attention_mask=attention_mask)
        logits = out.logits.clone()
        logits[..., self.ids] += self.amount
        out.logits = logits
        return out


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_llada_confidence_eos_eot_inf_and_logits_eos_inf(temperature):
    """Upstream's aliasing: both ids lose their confidence at temperature 0, only EOT above it.
    Suppressed ids get confidence exactly 0, so several of them tie; ddiff orders ties by
    position and ``torch.topk`` does not specify an order, so the model is one where no such tie
    decides a commit."""
    eos, eot = 3, 5
    model = Boost(LLaDASignature(random_qwen3(3), push_down=MASK), [eos, eot], 1.0)
    prompt = prompt_for(32, 6, eos, eot)
    kwargs = dict(temperature=temperature)
    if temperature > 0:
        kwargs["exponential_fn"], kwargs["uniform_fn"] = llada_noise(7)
    pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention_mask_format="2d", eos_token_id=[eos, eot],
                                  backend="torch")
    call = dict(input_ids=prompt, max_new_tokens=16, block_length=8, steps_per_block=8, temperature=temperature,
                seed=7, eos_early_stop=False, progress=False)
    results = {}
    for flag in (False, True):
        want = llada.generate(model, prompt, steps=16, gen_length=16, block_length=8, mask_id=MASK, eos_id=eos,
                              eot_id=eot, confidence_eos_eot_inf=flag, **kwargs)
        got = pipe(confidence_eos_eot_inf=flag, **call).sequences.tolist()
        assert got == tokens_after(want, 6)
        results[flag] = got
    assert results[True] != results[False]  # the flag mattered here
    want = llada.generate(model, prompt, steps=16, gen_length=16, block_length=8, mask_id=MASK, eos_id=eos,
                          logits_eos_inf=True, **kwargs)
    assert pipe(suppress_tokens=[eos], **call).sequences.tolist() == tokens_after(want, 6)


# ---------------------------------------------------------------------------------------------
# Fast-dLLM
# ---------------------------------------------------------------------------------------------
FAST_RULES = [dict(threshold=0.2), dict(threshold=0.5), dict(factor=1.0), dict(factor=2.5)]
# vocab-12 models predict the mask id; with these seeds and rules the published loop still ends
FAST_CASES = [(seed, 32, rule) for seed in (0, 2) for rule in FAST_RULES] + [
    (23, 12, FAST_RULES[0]), (23, 12, FAST_RULES[1]), (25, 12, FAST_RULES[1]), (25, 12, FAST_RULES[3])]


@pytest.mark.parametrize("seed, vocab, rule", FAST_CASES)
def test_fast_dllm_threshold_and_factor(seed, vocab, rule):
    model = LLaDASignature(random_qwen3(seed, vocab=vocab, std=0.5))
    prompt = prompt_for(vocab, 6)
    want, nfe = fast_dllm.generate(model, prompt, steps=2, gen_length=16, block_length=8, mask_id=MASK, **rule)
    pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention_mask_format="2d", backend="torch")
    out = pipe(input_ids=prompt, max_new_tokens=16, block_length=8, eos_early_stop=False, progress=False, **rule)
    assert out.sequences.tolist() == tokens_after(want, 6)
    assert out.nfe == nfe


# ---------------------------------------------------------------------------------------------
# Dream diffusion_generate
# ---------------------------------------------------------------------------------------------
def dream_pipeline(model):
    kwargs = get_preset("dream").pipeline_kwargs()
    kwargs.update(mask_token_id=MASK, eos_token_id=None, backend="torch")
    return BlockDiffusionPipeline(model, **kwargs)


ALGS = [("maskgit_plus", "low_confidence"), ("topk_margin", "margin"), ("entropy", "entropy")]


@pytest.mark.parametrize("alg, remasking", ALGS)
@pytest.mark.parametrize("seed, vocab", [(0, 32), (5, 12)])
def test_dream_confidence_algorithms(alg, remasking, seed, vocab):
    model = random_qwen3(seed, vocab=vocab, std=0.5)
    prompt = prompt_for(vocab, 6)
    pipe = dream_pipeline(model)
    for steps in (5, 16):
        want = dream.diffusion_generate(full_attention(model), prompt, 16, steps, MASK, alg=alg, temperature=0.0)
        out = pipe(input_ids=prompt, max_new_tokens=16, block_length=16, steps_per_block=steps, remasking=remasking,
                   eos_early_stop=False, progress=False)
        assert out.sequences.tolist() == tokens_after(want, 6), steps
        assert out.nfe == steps


def test_dream_top_p_and_top_k_at_temperature_zero():
    """The confidence is measured under the filtered distribution. (A nucleus of one token has
    entropy exactly 0; such ties are ordered by position here and unspecified in torch.topk, so
    the filters are loose enough that none decides a commit.)"""
    model = random_qwen3(3)
    prompt = prompt_for(32, 5)
    pipe = dream_pipeline(model)
    for kwargs in (dict(top_p=0.95), dict(top_k=5)):
        want = dream.diffusion_generate(full_attention(model), prompt, 12, 6, MASK, alg="entropy", temperature=0.0,
                                        **kwargs)
        out = pipe(input_ids=prompt, max_new_tokens=12, block_length=12, steps_per_block=6, remasking="entropy",
                   eos_early_stop=False, progress=False, **kwargs)
        assert out.sequences.tolist() == tokens_after(want, 5), kwargs


@pytest.mark.parametrize("seed, vocab", [(0, 32), (5, 12)])
def test_dream_origin(seed, vocab):
    """alg="origin": each mask revealed with probability 1 - s/t (the coins from ddiff's
    ``confidence="random"`` stream), to its argmax at temperature 0, the mask id included."""
    model = random_qwen3(seed, vocab=vocab, std=0.5)
    prompt = prompt_for(vocab, 6)
    pipe = dream_pipeline(model)
    for steps in (1, 6):
        want = dream.diffusion_generate(full_attention(model), prompt, 12, steps, MASK, alg="origin",
                                        temperature=0.0, rand_fn=dream_coin(9, 6))
        out = pipe(input_ids=prompt, max_new_tokens=12, block_length=12, steps_per_block=steps, remasking="origin",
                   seed=9, eos_early_stop=False, progress=False)
        assert out.sequences.tolist() == tokens_after(want, 6), steps


def test_dream_alg_temp():
    """alg_temp: positions drawn as multinomial(softmax(confidence / alg_temp), k); fed ddiff's
    Gumbel-top-k draws, the restated loop gives the pipeline's tokens."""
    model = random_qwen3(1, std=0.5)
    prompt = prompt_for(32, 6)
    pipe = dream_pipeline(model)
    for alg, remasking in ALGS[::2]:
        want = dream.diffusion_generate(full_attention(model), prompt, 12, 6, MASK, alg=alg, alg_temp=0.5,
                                        temperature=0.0, multinomial_fn=dream_alg_temp(3, 6))
        out = pipe(input_ids=prompt, max_new_tokens=12, block_length=12, steps_per_block=6, remasking=remasking,
                   selection_temperature=0.5, seed=3, eos_early_stop=False, progress=False)
        assert out.sequences.tolist() == tokens_after(want, 6), alg
    greedy = pipe(input_ids=prompt, max_new_tokens=12, block_length=12, steps_per_block=6, remasking="entropy",
                  eos_early_stop=False, progress=False)
    assert greedy.sequences.tolist() != out.sequences.tolist()


def test_dream_schedule_counts_in_the_pipeline():
    """8 tokens in 4 steps: Dream commits [1, 2, 2, 3] (LLaDA's split would be [2, 2, 2, 2])."""
    model = random_qwen3(0)
    seen = []
    callback = lambda pipe, step, i, kw: seen.append(int(kw["transfer_index"].sum()))  # noqa: E731
    dream_pipeline(model)(input_ids=prompt_for(32, 4), max_new_tokens=8, block_length=8, steps_per_block=4,
                          eos_early_stop=False, progress=False, callback_on_step_end=callback)
    assert seen == [1, 2, 2, 3]
    seen.clear()
    dream_pipeline(model)(input_ids=prompt_for(32, 4), max_new_tokens=8, block_length=8, steps_per_block=4,
                          schedule="llada", eos_early_stop=False, progress=False, callback_on_step_end=callback)
    assert seen == [2, 2, 2, 2]


# ---------------------------------------------------------------------------------------------
# SDAR
# ---------------------------------------------------------------------------------------------
SDAR_RULES = [("low_confidence_static", {}), ("low_confidence_dynamic", dict(threshold=0.3)),
              ("sequential", dict(remasking="sequential"))]


@pytest.mark.parametrize("strategy, rule", SDAR_RULES)
@pytest.mark.parametrize("prompt_len, block_length, steps", [(6, 4, 2), (6, 8, 4), (8, 4, 4)])
def test_sdar(strategy, rule, prompt_len, block_length, steps):
    """The prompt ends inside the first block in two of the layouts (its schedule still covers the
    whole block); prompt + max_new_tokens ends on a block boundary, as SDAR always decodes whole
    blocks. The restated loop caps a step's count at the masks left (ddiff's and LLaDA2's rule;
    SDAR's topk would re-write decoded positions instead)."""
    model = random_qwen3(2, std=0.5)
    prompt = prompt_for(32, prompt_len)
    gen = 24 - prompt_len
    want, _ = sdar.block_diffusion_generate(block_causal(model), prompt, MASK, gen_length=gen,
                                            block_length=block_length, denoising_steps=steps, temperature=0.0,
                                            remasking_strategy=strategy, confidence_threshold=0.3, cap_to_masks=True)
    for cache in (True, False):
        pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention="block_causal", use_kv_cache=cache,
                                      attention_mask_format="4d_bool", scheduler=get_preset("sdar").scheduler(),
                                      backend="torch")
        out = pipe(input_ids=prompt, max_new_tokens=gen, block_length=block_length, steps_per_block=steps,
                   eos_early_stop=False, progress=False, **rule)
        assert out.sequences.tolist() == tokens_after(want, prompt_len, gen)


def masks_written(pipe, **kwargs):
    """How many times the pipeline wrote the mask id (committed or edited) during a call."""
    count = [0]

    def callback(p, step, i, kw):
        count[0] += int(((kw["tokens"] == MASK) & (kw["transfer_index"] | kw["edit_index"])).sum())

    out = pipe(callback_on_step_end=callback, progress=False, **kwargs)
    return out, count[0]


def test_sdar_dynamic_with_a_predicted_mask_id():
    model = random_qwen3(9, vocab=12, std=0.5)
    prompt = prompt_for(12, 6)
    want, _ = sdar.block_diffusion_generate(block_causal(model), prompt, MASK, gen_length=18, block_length=4,
                                            denoising_steps=2, temperature=0.0,
                                            remasking_strategy="low_confidence_dynamic", confidence_threshold=0.3,
                                            cap_to_masks=True)
    pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention="block_causal",
                                  attention_mask_format="4d_bool", scheduler=get_preset("sdar").scheduler(),
                                  backend="torch")
    out, written = masks_written(pipe, input_ids=prompt, max_new_tokens=18, block_length=4, steps_per_block=2,
                                 threshold=0.3, eos_early_stop=False)
    assert written > 0 and out.sequences.tolist() == tokens_after(want, 6, 18)


def test_first_block_holding_the_prompt_commits_by_the_whole_blocks_schedule():
    """A 6-token prompt, block 8 and 4 steps: the first block's 2 masks go in one step (upstream's
    schedule over the whole block, capped), not 1 + 1."""
    model = random_qwen3(0)
    pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention="block_causal", backend="torch")
    out = pipe(input_ids=prompt_for(32, 6), max_new_tokens=10, block_length=8, steps_per_block=4,
               eos_early_stop=False, progress=False)
    assert out.block_steps == [1, 4] and out.nfe == 5


# ---------------------------------------------------------------------------------------------
# LLaDA2
# ---------------------------------------------------------------------------------------------
EOS = 3
LLADA2_CASES = {
    "2.0-block4": dict(block_length=4, steps=4, threshold=0.5),
    "2.0-block8": dict(block_length=8, steps=4, threshold=0.3),
    "2.1": dict(block_length=4, steps=4, threshold=0.5, editing_threshold=0.3, max_post_steps=2),
    "2.1-block8": dict(block_length=8, steps=8, threshold=0.6, editing_threshold=0.5, max_post_steps=1),
}
# vocab-12 models predict the mask id: with seed 5 LLaDA2.0 commits it 15 times (its 2.1 loop
# never ends: edits keep writing it back), and a 2.1 case of seed 3 edits a decoded token into
# it, re-opening the block
LLADA2_MODELS = [pytest.param(seed, vocab, case, id=f"{seed}-{vocab}-{name}")
                 for seed, vocab in ((0, 32), (3, 12)) for name, case in LLADA2_CASES.items()] + [
    pytest.param(5, 12, LLADA2_CASES[name], id=f"5-12-{name}") for name in ("2.0-block4", "2.0-block8")]


@pytest.mark.parametrize("seed, vocab, case", LLADA2_MODELS)
@pytest.mark.parametrize("eos_early_stop", [False, True])
def test_llada2(case, eos_early_stop, seed, vocab):
    model = random_qwen3(seed, vocab=vocab, std=0.5)
    prompt = prompt_for(vocab, 5, EOS)
    gen = 24 - 5
    case = dict(case)
    steps = case.pop("steps")
    want, nfe = llada2.generate(block_causal(model), prompt, gen_length=gen, steps=steps, eos_id=EOS, mask_id=MASK,
                                eos_early_stop=eos_early_stop, temperature=0.0, **case)
    pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention="block_causal", use_kv_cache=False,
                                  scheduler=get_preset("llada2").scheduler(), eos_token_id=EOS, backend="torch")
    out = pipe(input_ids=prompt, max_new_tokens=gen, steps_per_block=steps, eos_early_stop=eos_early_stop,
               progress=False, **case)
    got = out.sequences[0].tolist()
    if not eos_early_stop and EOS in got:  # LLaDA2 always cuts after the first EOS
        got = got[:got.index(EOS) + 1]
    assert got == want[0].tolist()
    if eos_early_stop:
        assert out.nfe == nfe
