"""BlockDiffusionPipeline on tiny transformers models (CPU; Triton interpreted).

* A 2-layer Qwen3 trained by ``scripts/train_tiny_block_model.py`` to copy its prompt must be
  decoded correctly (>= 95% of tokens) in every attention kind it was trained for; an untrained
  model must fail the same check.
* LLaDA's ``generate`` loop (tests/upstream/llada.py) gives the same tokens as the pipeline,
  greedy and with seeds (its noise drawn from ddiff's Philox streams); the other published
  loops are compared in test_block_diffusion_upstream.py.
* The KV-cache path gives the same tokens as recomputing the prefix; the torch and triton
  backends give the same tokens; max_new_tokens is honoured exactly; EOS early stop works.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch
from upstream import llada as upstream_llada
from upstream.harness import llada_noise

from ddiff.pipelines import BlockDiffusionPipeline, BlockDiffusionPipelineOutput
from ddiff.pipelines.utils import DiscreteDiffusionPipelineOutput

ASSET = os.path.join(os.path.dirname(__file__), "assets", "tiny_block_copy")
with open(ASSET + ".json") as _f:
    META = json.load(_f)
TOK = META["tokens"]
PAD, BOS, SEP, EOS, MASK = TOK["pad"], TOK["bos"], TOK["sep"], TOK["eos"], TOK["mask"]
SYMBOLS = list(range(TOK["first_symbol"], TOK["first_symbol"] + TOK["num_symbols"]))
LETTERS = "abcdefghijklmnop"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def _qwen3(config: dict):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**config)
    cfg._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(cfg).eval()


@functools.lru_cache(maxsize=None)
def trained_model():
    from safetensors.torch import load_file

    model = _qwen3(META["model_config"])
    model.load_state_dict(load_file(ASSET + ".safetensors"))
    return model


def untrained_model():
    torch.manual_seed(0)
    return _qwen3(META["model_config"])


def random_model(seed: int = 0, vocab: int = 32, std: float = 0.3):
    """A random 2-layer Qwen3 (hidden 64) with spread-out logits."""
    torch.manual_seed(seed)
    model = _qwen3(dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model


class LLaDALike(torch.nn.Module):
    """A causal transformers LM made bidirectional, with LLaDA's call signature.

    ``forward(input_ids, attention_mask=None)``: no position ids, a 2-D padding mask. The mask
    token's logit is pushed far down (a trained LLaDA never predicts it).
    """

    def __init__(self, lm, mask_id: int = MASK):
        super().__init__()
        self.lm = lm
        self.mask_id = mask_id

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        keys = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        allowed = keys[:, None, None, :] | torch.eye(T, dtype=torch.bool)[None, None]
        additive = torch.zeros(B, 1, T, T).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        logits = self.lm(input_ids=input_ids, attention_mask=additive).logits.clone()
        logits[..., self.mask_id] = -1e4
        return SimpleNamespace(logits=logits)


class ForcedToken(torch.nn.Module):
    """Wraps a model and makes one token overwhelmingly likely everywhere."""

    def __init__(self, lm, token: int):
        super().__init__()
        self.lm, self.token = lm, token

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=past_key_values, use_cache=use_cache)
        logits = out.logits.clone()
        logits[..., self.token] = 50.0
        return SimpleNamespace(logits=logits)


class ShiftedOutput(torch.nn.Module):
    """Returns the inner model's logits shifted right by one (what Dream's sampler does itself)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        return SimpleNamespace(logits=torch.cat([logits[:, :1], logits[:, :-1]], dim=1))


def make_tokenizer():
    """A word-level tokenizer for the copy task: 'a b c' -> BOS a b c SEP."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = ["<pad>", "<s>", "<sep>", "</s>", "<mask>"] + list(LETTERS)
    names += [f"<unused{i}>" for i in range(META["model_config"]["vocab_size"] - len(names))]
    vocab = {t: i for i, t in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A <sep>", special_tokens=[("<s>", BOS),
                                                                                             ("<sep>", SEP)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   mask_token="<mask>", sep_token="<sep>")


# ---------------------------------------------------------------------------------------------
# the copy task
# ---------------------------------------------------------------------------------------------
def copy_examples(num: int, seed: int):
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n = rng.randint(3, 10)
        symbols = [SYMBOLS[i] for i in rng.sample(range(len(SYMBOLS)), n)]
        out.append(([BOS] + symbols + [SEP], symbols))
    return out


def left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def copy_accuracy(pipe, examples, max_new_tokens: int, **kwargs) -> float:
    """Fraction of the expected tokens (symbols, then EOS to the end) the pipeline produces."""
    ids, mask = left_pad([p for p, _ in examples])
    out = pipe(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_early_stop=False,
               progress=False, **kwargs)
    assert out.sequences.shape == (len(examples), max_new_tokens)
    correct = total = 0
    for row, (_, symbols) in zip(out.sequences.tolist(), examples):
        expected = (symbols + [EOS] * max_new_tokens)[:max_new_tokens]
        correct += sum(int(a == b) for a, b in zip(row, expected))
        total += max_new_tokens
    return correct / total


MODES = [
    pytest.param(dict(attention="bidirectional"), id="bidirectional"),
    pytest.param(dict(attention="block_causal", use_kv_cache=True), id="block_causal-kv"),
    pytest.param(dict(attention="block_causal", use_kv_cache=False), id="block_causal-recompute"),
    pytest.param(dict(attention="causal", use_kv_cache=True), id="causal-kv"),
]
RULES = [
    pytest.param(dict(steps_per_block=4), id="llada-schedule"),
    pytest.param(dict(threshold=0.9), id="fast-dllm-threshold"),
    pytest.param(dict(steps_per_block=2, threshold=0.9), id="sdar-dynamic"),
]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("mode", MODES)
def test_trained_model_copies_prompt(mode, rule):
    assert mode["attention"] in META["trained_attention"]
    pipe = BlockDiffusionPipeline(trained_model(), mask_token_id=MASK, eos_token_id=EOS, backend="torch", **mode)
    acc = copy_accuracy(pipe, copy_examples(16, seed=7), max_new_tokens=14, block_length=4, **rule)
    assert acc >= 0.95, f"copy accuracy {acc:.3f}"


def test_accuracy_check_rejects_an_untrained_model():
    pipe = BlockDiffusionPipeline(untrained_model(), mask_token_id=MASK, eos_token_id=EOS, backend="torch")
    acc = copy_accuracy(pipe, copy_examples(16, seed=7), max_new_tokens=14, block_length=4, steps_per_block=4)
    assert acc < 0.5


def test_trained_model_with_text_prompts_and_early_stop():
    tok = make_tokenizer()
    pipe = BlockDiffusionPipeline(trained_model(), tok, backend="torch", attention="block_causal")
    assert pipe.mask_token_id == MASK
    prompts = ["a b c", "p o n m l k j", "c a f e"]
    out = pipe(prompts, max_new_tokens=16, block_length=4, steps_per_block=4, progress=False)
    assert isinstance(out, BlockDiffusionPipelineOutput) and isinstance(out, DiscreteDiffusionPipelineOutput)
    assert out.texts == prompts
    # stopped at EOS: the longest answer is 7 symbols + EOS; shorter rows are padded after their EOS
    assert out.sequences.shape == (3, 8)
    assert out.sequences[0].tolist() == [5, 6, 7, EOS] + [PAD] * 4
    assert out.finished.tolist() == [True, True, True]
    full = pipe(prompts, max_new_tokens=16, block_length=4, steps_per_block=4, eos_early_stop=False, progress=False)
    assert full.sequences.shape == (3, 16) and full.texts == prompts
    assert out.nfe < full.nfe and len(out.block_times) < len(full.block_times)


# ---------------------------------------------------------------------------------------------
# LLaDA's generate (tests/upstream/llada.py), greedy and with ddiff's noise
# ---------------------------------------------------------------------------------------------
LLADA_CASES = [
    pytest.param(dict(), id="greedy"),
    pytest.param(dict(cfg_scale=1.5), id="greedy-cfg"),
    pytest.param(dict(temperature=0.8, seed=11), id="seeded"),
    pytest.param(dict(temperature=0.5, seed=3, cfg_scale=0.5), id="seeded-cfg"),
    pytest.param(dict(remasking="random", seed=5), id="random-remasking"),
]


@pytest.mark.parametrize("padded", [False, True], ids=["one-prompt", "left-padded-batch"])
@pytest.mark.parametrize("case", LLADA_CASES)
def test_matches_llada_generate(case, padded):
    model = LLaDALike(random_model(seed=1))
    if padded:
        prompt, attention_mask = torch.tensor([[0, 0, 1, 9, 12, 2], [1, 17, 5, 20, 8, 2]]), \
            torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    else:
        prompt, attention_mask = torch.tensor([[1, 9, 12, 30, 7, 2]]), None
    gen_length, block_length, steps = 16, 8, 8
    seed = case.get("seed")
    exponential_fn, uniform_fn = llada_noise(seed) if seed is not None else (None, None)
    expected = upstream_llada.generate(model, prompt, attention_mask, steps=steps, gen_length=gen_length,
                                       block_length=block_length, temperature=case.get("temperature", 0.0),
                                       cfg_scale=case.get("cfg_scale", 0.0),
                                       remasking=case.get("remasking", "low_confidence"), mask_id=MASK,
                                       exponential_fn=exponential_fn, uniform_fn=uniform_fn)
    pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention="bidirectional", attention_mask_format="2d",
                                  backend="torch")
    out = pipe(input_ids=prompt, attention_mask=attention_mask, max_new_tokens=gen_length, block_length=block_length,
               steps_per_block=steps // (gen_length // block_length), eos_early_stop=False, progress=False, **case)
    assert out.sequences.tolist() == expected[:, prompt.shape[1]:].tolist()
    assert out.nfe == steps and out.steps == steps


# ---------------------------------------------------------------------------------------------
# cache vs recompute, backends, shapes
# ---------------------------------------------------------------------------------------------
CACHE_CASES = [
    pytest.param(dict(steps_per_block=3), id="schedule"),
    pytest.param(dict(threshold=0.3), id="threshold"),
    pytest.param(dict(factor=1.0), id="factor"),
    pytest.param(dict(steps_per_block=2, logits_shift=True), id="shift"),
    pytest.param(dict(steps_per_block=3, cfg_scale=1.0), id="cfg"),
    pytest.param(dict(steps_per_block=3, temperature=1.0, top_k=8, seed=4), id="seeded"),
    pytest.param(dict(threshold=0.3, editing_threshold=0.2, max_post_steps=2), id="editing"),
]


@pytest.mark.parametrize("case", CACHE_CASES)
@pytest.mark.parametrize("attention", ["block_causal", "causal"])
def test_kv_cache_matches_recompute(attention, case):
    model = random_model(seed=2)
    ids, mask = torch.tensor([[0, 0, 1, 9, 12, 2], [1, 17, 5, 20, 8, 2]]), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    outs = []
    for cache in (True, False):
        pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention=attention, use_kv_cache=cache,
                                      backend="torch")
        outs.append(pipe(input_ids=ids, attention_mask=mask, max_new_tokens=11, block_length=4, eos_token_id=3,
                         suppress_tokens=[MASK], eos_early_stop=False, progress=False, **case))
    assert outs[0].sequences.tolist() == outs[1].sequences.tolist()
    assert outs[0].nfe == outs[1].nfe and outs[0].steps == outs[1].steps
    assert not (outs[0].sequences == MASK).any()


def test_kv_cache_matches_recompute_on_trained_model():
    examples = copy_examples(8, seed=3)
    ids, mask = left_pad([p for p, _ in examples])
    outs = [
        BlockDiffusionPipeline(trained_model(), mask_token_id=MASK, attention="block_causal", use_kv_cache=c,
                               backend="torch")(input_ids=ids, attention_mask=mask, max_new_tokens=13,
                                                block_length=3, threshold=0.9, eos_early_stop=False, progress=False)
        for c in (True, False)
    ]
    assert outs[0].sequences.tolist() == outs[1].sequences.tolist()


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_logits_shift_uses_previous_position(attention):
    """Shifting in the pipeline equals a model that shifts its own output (Dream's convention)."""
    model = random_model(seed=3)
    ids = torch.tensor([[1, 9, 12, 30, 7, 2]])
    kwargs = dict(input_ids=ids, max_new_tokens=9, block_length=4, steps_per_block=2, progress=False,
                  eos_early_stop=False)
    plain = BlockDiffusionPipeline(ShiftedOutput(model), mask_token_id=MASK, attention=attention,
                                   use_kv_cache=False, backend="torch")(**kwargs)
    shifted = BlockDiffusionPipeline(model, mask_token_id=MASK, attention=attention, use_kv_cache=False,
                                     backend="torch")(logits_shift=True, **kwargs)
    unshifted = BlockDiffusionPipeline(model, mask_token_id=MASK, attention=attention, use_kv_cache=False,
                                       backend="torch")(**kwargs)
    assert shifted.sequences.tolist() == plain.sequences.tolist()
    assert shifted.sequences.tolist() != unshifted.sequences.tolist()


TRITON_CASES = [
    pytest.param(dict(steps_per_block=3), id="greedy-schedule"),
    pytest.param(dict(threshold=0.2), id="greedy-threshold"),
    pytest.param(dict(steps_per_block=3, temperature=1.0, seed=9), id="seeded"),
    pytest.param(dict(steps_per_block=3, temperature=1.0, top_p=0.9, remasking="margin", generator=True),
                 id="generator"),
]


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_torch(case, device):
    # CPU: the triton backend runs under TRITON_INTERPRET=1 (conftest); CUDA: compiled kernels.
    model = random_model(seed=4).to(device)
    ids = torch.tensor([[0, 1, 9, 2], [1, 17, 5, 2]], device=device)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], device=device)
    outs = []
    for backend in ("torch", "triton"):
        kwargs = dict(case)
        if kwargs.pop("generator", False):
            kwargs["generator"] = torch.Generator().manual_seed(21)
        pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention="block_causal", backend=backend)
        outs.append(pipe(input_ids=ids, attention_mask=mask, max_new_tokens=6, block_length=3, eos_early_stop=False,
                         progress=False, **kwargs))
    assert outs[0].sequences.tolist() == outs[1].sequences.tolist()
    assert outs[0].nfe == outs[1].nfe


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal", "causal"])
@pytest.mark.parametrize("max_new_tokens", [1, 5, 7, 13])
def test_max_new_tokens_is_honoured_exactly(attention, max_new_tokens):
    """Output is never cut short at a block boundary (the DFlash review's truncation bug)."""
    model = random_model(seed=5)
    pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention=attention, backend="torch")
    ids = torch.tensor([[1, 9, 12, 30, 7, 2], [1, 20, 5, 6, 7, 2]])
    for rule in (dict(steps_per_block=4), dict(threshold=0.5)):
        # EOS (and the mask id) suppressed: early stop on, but it can never trigger
        out = pipe(input_ids=ids, max_new_tokens=max_new_tokens, block_length=4, eos_token_id=3,
                   suppress_tokens=[3, MASK], progress=False, **rule)
        assert out.sequences.shape == (2, max_new_tokens)
        assert not (out.sequences == MASK).any() and not (out.sequences == 3).any()
        assert len(out.block_times) == len(out.block_steps) == -(-(max_new_tokens + (
            0 if attention == "bidirectional" else ids.shape[1] % 4)) // 4)


def test_eos_at_first_generated_position():
    """EOS as the very first new token stops the row (and the call) with a one-token output, at
    the step that wrote it (LLaDA2's stop inside a block)."""
    model = ForcedToken(random_model(seed=6), token=3)
    for attention in ("bidirectional", "block_causal"):
        pipe = BlockDiffusionPipeline(model, mask_token_id=MASK, attention=attention, eos_token_id=3,
                                      backend="torch")
        out = pipe(input_ids=torch.tensor([[1, 9, 12, 2]]), max_new_tokens=12, block_length=4, steps_per_block=4,
                   progress=False)
        assert out.sequences.tolist() == [[3]]
        assert out.finished.tolist() == [True]
        assert len(out.block_times) == 1 and out.nfe == 1 and out.block_steps == [1]


def test_early_stop_rows_finish_independently():
    """A row that stopped is frozen and padded after its EOS while the others go on."""
    pipe = BlockDiffusionPipeline(trained_model(), mask_token_id=MASK, eos_token_id=EOS, backend="torch",
                                  attention="bidirectional")
    examples = [([BOS, 5, 6, 7, SEP], [5, 6, 7]), ([BOS] + SYMBOLS[:9] + [SEP], SYMBOLS[:9])]
    ids, mask = left_pad([p for p, _ in examples])
    out = pipe(input_ids=ids, attention_mask=mask, max_new_tokens=16, block_length=4, steps_per_block=4,
               progress=False)
    assert out.sequences.shape == (2, 10)
    assert out.sequences[0].tolist() == [5, 6, 7, EOS] + [PAD] * 6
    assert out.sequences[1].tolist() == SYMBOLS[:9] + [EOS]
    assert len(out.block_times) == 3


def test_batched_prompts_match_single_prompts_bidirectional():
    pipe = BlockDiffusionPipeline(random_model(seed=7), mask_token_id=MASK, backend="torch")
    prompts = [[1, 9, 12, 2], [1, 17, 5, 20, 8, 11, 2], [1, 6, 2]]
    ids, mask = left_pad(prompts)
    kwargs = dict(max_new_tokens=7, block_length=4, steps_per_block=2, eos_early_stop=False, progress=False)
    batched = pipe(input_ids=ids, attention_mask=mask, **kwargs).sequences
    for row, p in zip(batched.tolist(), prompts):
        assert row == pipe(input_ids=torch.tensor([p]), **kwargs).sequences[0].tolist()


# ---------------------------------------------------------------------------------------------
# callbacks, editing, progress bar
# ---------------------------------------------------------------------------------------------
def test_callback_receives_tensors_and_its_x_is_used():
    pipe = BlockDiffusionPipeline(trained_model(), mask_token_id=MASK, eos_token_id=EOS, backend="torch")
    prompt = [BOS, 5, 6, 7, 8, SEP]
    seen = []

    def callback(p, step, step_in_block, kw):
        assert p is pipe
        seen.append((step, step_in_block, kw["tokens"].shape, kw["transfer_index"].dtype))
        if step == 0:  # force a token at the last position of the first block
            x = kw["x"].clone()
            x[0, len(prompt) + 3] = 20
            return {"x": x}
        return None

    out = pipe(input_ids=torch.tensor([prompt]), max_new_tokens=8, block_length=4, steps_per_block=4,
               eos_early_stop=False, progress=False, callback_on_step_end=callback)
    assert out.sequences[0, 3].item() == 20
    assert [s[0] for s in seen] == list(range(out.steps))
    assert seen[0][1:] == (0, torch.Size([1, 4]), torch.bool)
    assert out.steps < 8  # the forced position was no longer a mask: the block finished early

    with pytest.raises(ValueError, match="unknown keys"):
        pipe(input_ids=torch.tensor([prompt]), max_new_tokens=4, block_length=4, steps_per_block=4, progress=False,
             callback_on_step_end=lambda *a: {"latents": None})


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_editing_rewrites_only_confident_disagreements(attention):
    """LLaDA2.1-style editing: decoded, non-prompt tokens of the block whose prediction differs
    with confidence above ``editing_threshold`` are re-written; ``max_post_steps`` bounds the extra
    steps. (The tiny model is not trained to edit, so only the mechanics are checked.)"""
    prompt = [BOS, 5, 6, 7, 8, 9, 10, SEP]
    state, edits_seen = {}, []

    def check(p, step, step_in_block, kw):
        s, e = kw["block_start"], kw["block_end"]
        if step_in_block == 0:
            state["prev"], state["masked"] = state["x"][:, s:e], state["x"][:, s:e] == MASK
        before, masked = state["prev"], state["masked"]
        tokens, conf, commit, edit = kw["tokens"], kw["confidence"], kw["transfer_index"], kw["edit_index"]
        assert not (commit & ~masked).any() and not (edit & masked).any()
        assert not (edit & ((tokens == before) | (conf <= 0.5))).any()
        assert torch.equal(kw["x"][:, s:e], torch.where(commit | edit, tokens, before))
        edits_seen.append(int(edit.sum()))
        x = kw["x"]
        if step == 0:  # corrupt a committed token so there is something to edit
            x = x.clone()
            x[0, len(prompt) + 3] = 15
        state["prev"], state["masked"], state["x"] = x[:, s:e].clone(), x[:, s:e] == MASK, x.clone()
        return {"x": x}

    pipe = BlockDiffusionPipeline(trained_model(), mask_token_id=MASK, eos_token_id=EOS, backend="torch",
                                  attention=attention)
    ids = torch.tensor([prompt])
    state["x"] = torch.cat([ids, torch.full((1, 8), MASK)], dim=1)
    kwargs = dict(input_ids=ids, max_new_tokens=8, block_length=4, threshold=0.9, eos_early_stop=False,
                  progress=False)
    edited = pipe(editing_threshold=0.5, max_post_steps=2, callback_on_step_end=check, **kwargs)
    assert sum(edits_seen) > 0
    plain = pipe(**kwargs)
    assert all(n <= m + 2 + 1 for n, m in zip(edited.block_steps, plain.block_steps))
    # a threshold nothing can pass: same tokens, plus one post step per block to find no edit
    never = pipe(editing_threshold=1.0, max_post_steps=2, **kwargs)
    assert never.sequences.tolist() == plain.sequences.tolist()
    assert never.block_steps == [n + 1 for n in plain.block_steps]


def test_progress_bar_config_is_preserved():
    pipe = BlockDiffusionPipeline(random_model(seed=8), mask_token_id=MASK, backend="torch")
    buf = io.StringIO()
    pipe.set_progress_bar_config(desc="decoding", leave=False, file=buf)
    kwargs = dict(input_ids=torch.tensor([[1, 2]]), max_new_tokens=4, block_length=2, steps_per_block=1)
    pipe(progress=False, **kwargs)
    assert buf.getvalue() == ""
    pipe(**kwargs)
    assert "decoding" in buf.getvalue()
    assert pipe.progress_bar_config == {"desc": "decoding", "leave": False, "file": buf}
    pipe.set_progress_bar_config(disable=True, file=buf)
    buf.truncate(0)
    buf.seek(0)
    pipe(progress=True, **kwargs)  # the user's disable wins over progress=True
    assert buf.getvalue() == ""


def test_remasking_kinds_and_confidence_sources_decode_the_task():
    pipe = BlockDiffusionPipeline(trained_model(), mask_token_id=MASK, eos_token_id=EOS, backend="torch")
    examples = copy_examples(8, seed=9)
    for kwargs in (dict(remasking="margin"), dict(remasking="entropy", confidence_from="sampling"),
                   dict(remasking="low_confidence", temperature=0.3, top_p=0.9, seed=1)):
        assert copy_accuracy(pipe, examples, 12, block_length=4, steps_per_block=4, **kwargs) >= 0.95, kwargs
    out = pipe(input_ids=torch.tensor([[1, 5, 6, 2]]), max_new_tokens=8, block_length=4, steps_per_block=4,
               remasking="random", seed=0, progress=False, eos_early_stop=False)
    assert not (out.sequences == MASK).any()


# ---------------------------------------------------------------------------------------------
# errors, presets, loading
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0, steps_per_block=1), "max_new_tokens"),
    (dict(block_length=0, steps_per_block=1), "block_length"),
    (dict(block_length=4, steps_per_block=5), "cannot exceed"),
    (dict(factor=1.0, threshold=0.9), "cannot be combined"),
    (dict(steps_per_block=1, seed=1, generator=torch.Generator()), "not both"),
    (dict(steps_per_block=1, remasking="lowest"), "remasking"),
    (dict(steps_per_block=1, max_post_steps=2), "editing_threshold"),
    (dict(steps_per_block=1, attention_mask=torch.tensor([[1, 1, 0]])), "left-padded"),
    (dict(steps_per_block=1, input_ids=torch.tensor([list(range(5, 20)) * 5])), "context"),
    (dict(steps_per_block=1, max_new_tokens=62), "context"),
    (dict(steps_per_block=1, input_ids=torch.tensor([[1, MASK, 2]])), "mask token"),
    (dict(remasking="origin", threshold=0.5), "steps_per_block"),
    (dict(remasking="origin", steps_per_block=2, threshold=0.5), "cannot take"),
    (dict(steps_per_block=2, schedule="cosine"), "schedule"),
    (dict(steps_per_block=2, selection_temperature=-1.0), "selection_temperature"),
    (dict(threshold=0.5, selection_temperature=1.0), "steps_per_block"),
    (dict(steps_per_block=2, confidence_eos_eot_inf=1), "confidence_eos_eot_inf"),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
    pipe = BlockDiffusionPipeline(trained_model(), mask_token_id=MASK, backend="torch")
    call = dict(input_ids=torch.tensor([[1, 5, 2]]), max_new_tokens=4, block_length=4, progress=False)
    call.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        pipe(**call)


def test_constructor_errors():
    model = trained_model()
    tok = make_tokenizer()
    tok_without_mask = make_tokenizer()
    tok_without_mask.mask_token = None
    with pytest.raises(ValueError, match="no mask token"):
        BlockDiffusionPipeline(model, tok_without_mask)
    with pytest.raises(ValueError, match="no mask token"):
        BlockDiffusionPipeline(model)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        BlockDiffusionPipeline(model, mask_token_id=126336)
    with pytest.raises(ValueError, match="attention"):
        BlockDiffusionPipeline(model, tok, attention="sliding")
    with pytest.raises(ValueError, match="block-causal"):
        BlockDiffusionPipeline(model, tok, attention="block_causal", attention_mask_format="2d")
    with pytest.raises(ValueError, match="tokenizer"):
        BlockDiffusionPipeline(model, mask_token_id=MASK)(prompt="a b", max_new_tokens=2, steps_per_block=1)


def test_presets():
    llada, dream = BlockDiffusionPipeline.preset("llada"), BlockDiffusionPipeline.preset("dream")
    sdar, llada2 = BlockDiffusionPipeline.preset("sdar"), BlockDiffusionPipeline.preset("llada2")
    assert (llada.mask_token_id, llada.eos_token_id, llada.logits_shift, llada.attention) == \
        (126336, (126081, 126348), False, "bidirectional")
    assert (dream.mask_token_id, dream.logits_shift, dream.attention) == (151666, True, "bidirectional")
    assert (sdar.mask_token_id, sdar.attention, 151645 in sdar.eos_token_id) == (151669, "block_causal", True)
    assert (llada2.mask_token_id, llada2.eos_token_id, llada2.attention) == (156895, (156892,), "block_causal")
    assert all(p.trust_remote_code for p in (llada, dream, sdar, llada2))
    # the decoder's own rules: Dream's 1 - s/t schedule, and where each family measures confidence
    assert [p.schedule for p in (llada, dream, sdar, llada2)] == ["llada", "dream", "llada", "llada"]
    assert [p.confidence_from for p in (llada, dream, sdar, llada2)] == ["raw", "sampling", "sampling", "sampling"]
    scheduler = dream.pipeline_kwargs()["scheduler"]
    assert (scheduler.schedule, scheduler.confidence_from, scheduler.mask_token_id) == ("dream", "sampling", 151666)
    with pytest.raises(ValueError, match="unknown preset"):
        BlockDiffusionPipeline.preset("gpt")


def test_from_pretrained_loads_a_local_checkpoint(tmp_path):
    trained_model().save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    pipe = BlockDiffusionPipeline.from_pretrained(str(tmp_path), attention="block_causal", backend="torch")
    assert pipe.mask_token_id == MASK and pipe.tokenizer is not None
    out = pipe("d e f g", max_new_tokens=8, block_length=4, steps_per_block=4, progress=False)
    assert out.texts == ["d e f g"]
    with pytest.raises(ValueError, match="local checkpoint directory"):
        BlockDiffusionPipeline.from_pretrained(str(tmp_path / "missing"), preset="llada")
