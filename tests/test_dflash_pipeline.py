"""DFlashPipeline: lossless, seeded, cache-exact speculative decoding (CPU, tiny Qwen3 targets).

* Greedy output equals ``target.generate(do_sample=False)`` and a plain argmax loop token for
  token, for every block size, several prompt lengths and ``max_new_tokens`` in {1, 7, 30};
  also when the proposals are perfect, partly wrong, or equal the mask id.
* Stop tokens: the output ends right after the first one, also when it is accepted mid-block;
  an EOS as the very first token runs no draft round.
* With a seed every block size gives the tokens of a plain loop that samples position ``t``
  with ``ddiff.sample(..., seed, offset=t)`` (block_size=1 is that loop).
* After every round both KV caches hold exactly the committed positions and equal a fresh
  prefill (no K/V of rejected drafts).
* Hybrid / sliding-window targets are refused before generation; chat templates get
  ``enable_thinking``; bad input raises.
* The tiny draft trained by ``scripts/train_tiny_dflash.py`` (tests/assets) accepts far more
  than an untrained one and stays lossless.
"""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch

import ddiff
from tiny_qwen3 import MASK, VOCAB, tiny_target
from ddiff.pipelines import DFlashDraftModel, DFlashPipeline, DFlashPipelineOutput
from ddiff.pipelines.dflash import UnsupportedTargetError
from ddiff.pipelines.dflash_model import target_features

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def target():
    return tiny_target()


def tiny_draft(target, block_size=4, seed=1):
    torch.manual_seed(seed)
    return DFlashDraftModel.from_target_config(target.config, 1, block_size=block_size, mask_token_id=MASK,
                                               target_layer_ids=[0, 1]).to(target.dtype).eval()


@pytest.fixture(scope="module")
def pipe(target):
    return DFlashPipeline(tiny_draft(target), target, backend="torch")


def prompt_ids(length, seed=0):
    return torch.randint(0, MASK, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def argmax_loop(target, ids, n, stop=()):
    """Greedy decoding recomputing the whole sequence each step (no cache)."""
    out = []
    x = ids
    for _ in range(n):
        token = int(target(x).logits[0, -1].argmax())
        out.append(token)
        if token in stop:
            break
        x = torch.cat([x, torch.tensor([[token]])], dim=1)
    return out


@torch.no_grad()
def sampling_loop(target, ids, n, seed, **kw):
    """Plain target sampling: the token at absolute position t drawn with ddiff.sample(offset=t)."""
    out = []
    x = ids
    for _ in range(n):
        logits = target(x).logits[0, -1:].float()
        token = int(ddiff.sample(logits, seed=seed, offset=x.shape[1], backend="torch", **kw))
        out.append(token)
        x = torch.cat([x, torch.tensor([[token]])], dim=1)
    return out


def run(pipe, ids, **kw):
    kw.setdefault("stop_token_ids", [])
    return pipe(input_ids=ids, progress=False, output_type="ids", **kw)


# ---------------------------------------------------------------------------------------------
# losslessness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [1, 3, 11])
def test_greedy_equals_target_generate_for_every_block_size(target, pipe, prompt_len):
    ids = prompt_ids(prompt_len, seed=prompt_len)
    ref = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                          pad_token_id=0)[0, prompt_len:].tolist()
    assert ref == argmax_loop(target, ids, 30)
    for max_new in (1, 7, 30):
        for bs in (1, 2, 4, 16):
            out = run(pipe, ids, max_new_tokens=max_new, block_size=bs)
            assert isinstance(out, DFlashPipelineOutput)
            assert out.sequences.shape == (1, max_new)
            assert out.sequences[0].tolist() == ref[:max_new], (max_new, bs)
            assert 1 + sum(out.acceptance_lengths) == max_new
            assert out.nfe_target == 1 + len(out.acceptance_lengths)
            before = [1 + sum(out.acceptance_lengths[:r]) for r in range(len(out.acceptance_lengths))]
            assert out.nfe_draft == sum(1 for c in before if bs > 1 and max_new - c > 1)  # a 1-token block needs none
            assert out.nfe == out.nfe_target + out.nfe_draft and out.steps == len(out.acceptance_lengths)


def _scripted(pipe, continuation, corrupt=()):
    """Replace the draft's proposals by ``continuation`` (the true greedy tokens), with the listed
    absolute positions corrupted: the verifier must give the same output whatever is proposed."""

    def propose(pending, start, length, cache):
        tokens = []
        for pos in range(start + 1, start + length):
            true = continuation[pos] if pos < len(continuation) else 0
            tokens.append((true + 1) % MASK if pos in corrupt else true)
        return torch.tensor(tokens, dtype=torch.int64)

    pipe._propose = propose
    return pipe


@pytest.mark.parametrize("bs", [2, 5, 8])
def test_perfect_and_partly_wrong_proposals_give_the_same_tokens(target, bs):
    ids = prompt_ids(4, seed=11)
    ref = argmax_loop(target, ids, 30)
    continuation = ids[0].tolist() + ref
    P = ids.shape[1]
    perfect = _scripted(DFlashPipeline(tiny_draft(target, bs), target, backend="torch"), continuation)
    out = run(perfect, ids, max_new_tokens=30)
    assert out.sequences[0].tolist() == ref
    full, rest = divmod(29, bs)
    assert out.acceptance_lengths == [bs] * full + ([rest] if rest else [])  # last block cut to what is left
    corrupt = {P + 3, P + 4, P + 11, P + 20}
    partial = _scripted(DFlashPipeline(tiny_draft(target, bs), target, backend="torch"), continuation, corrupt)
    out = run(partial, ids, max_new_tokens=30)
    assert out.sequences[0].tolist() == ref
    assert max(out.acceptance_lengths) <= bs and min(out.acceptance_lengths) >= 1


def test_generated_mask_token_is_kept(target):
    ids = prompt_ids(5, seed=3)
    ref = argmax_loop(target, ids, 30)
    common = max(set(ref), key=ref.count)  # make a token the target really emits the draft's mask id
    draft = DFlashDraftModel.from_target_config(target.config, 1, block_size=4, mask_token_id=common,
                                                target_layer_ids=[0, 1]).to(target.dtype).eval()
    out = run(DFlashPipeline(draft, target, backend="torch"), ids, max_new_tokens=30)
    assert out.sequences[0].tolist() == ref and common in out.sequences[0].tolist()


def test_tied_embeddings_target(target):
    tied = tiny_target(tie_word_embeddings=True)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    ids = prompt_ids(4, seed=6)
    out = run(DFlashPipeline(tiny_draft(tied), tied, backend="torch"), ids, max_new_tokens=12)
    assert out.sequences[0].tolist() == argmax_loop(tied, ids, 12)


def test_draft_and_target_in_different_dtypes(target):
    low = tiny_target(dtype=torch.bfloat16)
    draft = tiny_draft(target).float()  # fp32 draft on a bf16 target: inputs and outputs are cast
    out = run(DFlashPipeline(draft, low, backend="torch"), prompt_ids(4), max_new_tokens=9, block_size=4)
    assert out.sequences.shape == (1, 9) and 1 + sum(out.acceptance_lengths) == 9


# ---------------------------------------------------------------------------------------------
# stop tokens
# ---------------------------------------------------------------------------------------------


def test_stop_token_ends_the_output_even_mid_block(target):
    ids = prompt_ids(4, seed=6)
    ref = argmax_loop(target, ids, 30)
    stop_at = next(i for i in range(4, 30) if ref[i] not in ref[:i] and i % 8)  # first occurrence, mid-block
    stop = ref[stop_at]
    continuation = ids[0].tolist() + ref
    pipe = _scripted(DFlashPipeline(tiny_draft(target, 8), target, backend="torch"), continuation)
    out = run(pipe, ids, max_new_tokens=30, stop_token_ids=[stop])
    assert out.sequences[0].tolist() == ref[:stop_at + 1] == argmax_loop(target, ids, 30, stop=(stop,))
    assert bool(out.finished[0])
    # with perfect proposals the stop token sat inside an accepted block
    assert out.acceptance_lengths[-1] < 8 and sum(out.acceptance_lengths) + 1 == stop_at + 1
    hf = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                         eos_token_id=stop, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert out.sequences[0].tolist() == hf


def test_eos_as_first_token_runs_no_draft_round(target, pipe):
    ids = prompt_ids(6, seed=4)
    first = argmax_loop(target, ids, 1)[0]
    out = run(pipe, ids, max_new_tokens=30, stop_token_ids=[first])
    assert out.sequences[0].tolist() == [first]
    assert out.nfe_draft == 0 and out.nfe_target == 1 and out.acceptance_lengths == []
    assert bool(out.finished[0])


def test_default_stop_ids_come_from_the_generation_config(target):
    ids = prompt_ids(4, seed=6)
    ref = argmax_loop(target, ids, 30)
    pipe = DFlashPipeline(tiny_draft(target), target, backend="torch")
    saved = target.generation_config.eos_token_id
    target.generation_config.eos_token_id = [ref[6]]
    try:
        out = pipe(input_ids=ids, max_new_tokens=30, progress=False, output_type="ids")
    finally:
        target.generation_config.eos_token_id = saved
    assert out.sequences[0].tolist() == ref[:ref.index(ref[6]) + 1]
    out = run(pipe, ids, max_new_tokens=30, stop_token_ids=[])
    assert out.sequences[0].tolist() == ref


# ---------------------------------------------------------------------------------------------
# seeded sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                dict(temperature=1.3, top_p=0.8)])
def test_seeded_sampling_does_not_depend_on_speculation(target, kw):
    ids = prompt_ids(5, seed=2)
    want = sampling_loop(target, ids, 12, seed=123, **kw)
    for bs in (1, 2, 4, 16):
        pipe = DFlashPipeline(tiny_draft(target, max(bs, 2)), target, backend="torch")
        out = run(pipe, ids, max_new_tokens=12, seed=123, block_size=bs, **kw)
        assert out.sequences[0].tolist() == want, bs
    other = run(DFlashPipeline(tiny_draft(target), target, backend="torch"), ids, max_new_tokens=12, seed=124, **kw)
    assert other.sequences[0].tolist() != want


def test_sampling_without_seed_follows_torch_manual_seed(target, pipe):
    ids = prompt_ids(5, seed=2)
    torch.manual_seed(7)
    a = run(pipe, ids, max_new_tokens=12, temperature=1.0)
    torch.manual_seed(7)
    b = run(pipe, ids, max_new_tokens=12, temperature=1.0, block_size=2)
    assert torch.equal(a.sequences, b.sequences)


def test_triton_backend_gives_the_torch_tokens(target):
    ids = prompt_ids(3, seed=5)
    draft = tiny_draft(target)
    a = run(DFlashPipeline(draft, target, backend="torch"), ids, max_new_tokens=4, temperature=0.9, seed=11)
    b = run(DFlashPipeline(draft, target, backend="triton"), ids, max_new_tokens=4, temperature=0.9, seed=11)
    assert torch.equal(a.sequences, b.sequences)


# ---------------------------------------------------------------------------------------------
# caches
# ---------------------------------------------------------------------------------------------


def _cache_kwarg():
    from transformers import Qwen3ForCausalLM

    return "cache" if "cache" in inspect.signature(Qwen3ForCausalLM.forward).parameters else "past_key_values"


def _layers_kv(cache):
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


@pytest.mark.parametrize("scripted", [False, True])
def test_caches_hold_exactly_the_committed_positions(target, scripted):
    from transformers import DynamicCache

    ids = prompt_ids(4, seed=11)
    P = ids.shape[1]
    pipe = DFlashPipeline(tiny_draft(target, 4), target, backend="torch")
    if scripted:  # accepted, partly accepted and rejected blocks all occur
        ref = argmax_loop(target, ids, 25)
        pipe = _scripted(pipe, ids[0].tolist() + ref, corrupt={P + 3, P + 9, P + 10, P + 17})
    seen = []

    def check(p, step, committed, kw):
        seq = kw["sequences"]
        assert seq.shape[1] == committed
        length = P + committed - 1  # every committed token but the last has been through the target
        assert kw["target_cache"].get_seq_length() == length
        assert kw["draft_cache"].get_seq_length() == length
        prefix = torch.cat([ids, seq[:, :-1]], dim=1)
        fresh = DynamicCache()
        with torch.no_grad():
            hs = target(prefix, use_cache=True, output_hidden_states=True, **{_cache_kwarg(): fresh}).hidden_states
        for (k, v), (fk, fv) in zip(_layers_kv(kw["target_cache"]), _layers_kv(fresh)):
            torch.testing.assert_close(k, fk, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(v, fv, rtol=1e-9, atol=1e-9)
        fresh_draft = DynamicCache()
        p.draft_model.extend_cache(target_features(hs, p.draft_model.target_layer_ids),
                                   torch.arange(length)[None], fresh_draft)
        for (k, v), (fk, fv) in zip(_layers_kv(kw["draft_cache"]), _layers_kv(fresh_draft)):
            torch.testing.assert_close(k, fk, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(v, fv, rtol=1e-9, atol=1e-9)
        seen.append(kw["acceptance_length"])
        return kw

    out = run(pipe, ids, max_new_tokens=25, callback_on_step_end=check)
    assert seen == out.acceptance_lengths and len(seen) >= 3
    if scripted:
        assert max(seen) == 4 and min(seen) == 1


def test_callback_cannot_replace_committed_tokens(target, pipe):
    ids = prompt_ids(3)

    def replace(p, step, committed, kw):
        return {"sequences": kw["sequences"] * 0}

    with pytest.raises(ValueError, match="cannot replace"):
        run(pipe, ids, max_new_tokens=5, callback_on_step_end=replace)
    with pytest.raises(TypeError, match="dict or None"):
        run(pipe, ids, max_new_tokens=5, callback_on_step_end=lambda *a: 3)


# ---------------------------------------------------------------------------------------------
# targets, drafts and inputs that are refused
# ---------------------------------------------------------------------------------------------


def test_hybrid_and_sliding_window_targets_are_refused(target):
    draft = tiny_draft(target)
    hybrid = tiny_target()
    hybrid.config.layer_types = ["linear_attention", "full_attention", "linear_attention"]
    for exc in (UnsupportedTargetError, NotImplementedError, ValueError):
        with pytest.raises(exc, match="linear_attention"):
            DFlashPipeline(draft, hybrid)
    sliding = tiny_target(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(UnsupportedTargetError, match="sliding_attention"):
        DFlashPipeline(draft, sliding)


def test_draft_target_mismatch_is_refused(target):
    from ddiff.pipelines.dflash_model import DFlashDraftModel as Draft

    cfg = tiny_draft(target).config.to_dict()
    with pytest.raises(ValueError, match="num_target_layers"):
        DFlashPipeline(Draft({**cfg, "num_target_layers": 4, "dflash_config": {"mask_token_id": MASK,
                                                                                 "target_layer_ids": [0, 1]}}), target)
    with pytest.raises(ValueError, match="vocab_size"):
        DFlashPipeline(Draft({**cfg, "vocab_size": VOCAB + 1}), target)
    with pytest.raises(ValueError, match="backend"):
        DFlashPipeline(tiny_draft(target), target, backend="cuda")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(), ValueError, "exactly one"),
    (dict(input_ids=torch.zeros(2, 3, dtype=torch.int64)), ValueError, "batch of one"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.int64)), ValueError, "at least one token"),
    (dict(input_ids=torch.zeros(1, 3)), ValueError, "integer"),
    (dict(prompt="hi"), ValueError, "tokenizer"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.int64), max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.int64), temperature=-1.0), ValueError, "temperature"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.int64), top_p=1.5), ValueError, "top_p"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.int64), top_k=-2), ValueError, "top_k"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.int64), seed=1.5), TypeError, "seed"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.int64), block_size=0), ValueError, "block_size"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.int64), stop_token_ids="x"), TypeError, "stop_token_ids"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.int64), output_type="pil"), ValueError, "output_type"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.int64), progress=1), TypeError, "progress"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.int64), use_chat_template=True), ValueError, "prompt"),
    (dict(input_ids=torch.zeros(1, 3, dtype=torch.int64), max_new_tokens=126), ValueError, "context"),
])
def test_bad_input(pipe, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pipe(progress=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# prompts, chat template, text
# ---------------------------------------------------------------------------------------------


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<think>", "</think>"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% if not enable_thinking %}"
                               " <think> </think>{% endif %}{% endif %}")
    return tokenizer


def test_chat_template_passes_enable_thinking(target):
    tok = tiny_tokenizer()
    pipe = DFlashPipeline(tiny_draft(target), target, tok, backend="torch")
    plain = pipe.encode_prompt("w1 w2", None, False, False, torch.device("cpu"))
    no_think = pipe.encode_prompt("w1 w2", None, True, False, torch.device("cpu"))
    think = pipe.encode_prompt("w1 w2", None, True, True, torch.device("cpu"))
    assert plain[0].tolist() == [7, 8]
    assert no_think[0].tolist() == [2, 7, 8, 3, 4, 5]
    assert think[0].tolist() == [2, 7, 8, 3]
    out = pipe(prompt="w1 w2", max_new_tokens=8, use_chat_template=True, stop_token_ids=[], progress=False)
    assert out.sequences[0].tolist() == argmax_loop(target, no_think, 8)
    assert out.texts == tok.batch_decode(out.sequences.tolist(), skip_special_tokens=True)
    out = pipe(prompt=["w1 w2"], max_new_tokens=8, use_chat_template=True, enable_thinking=True,
               stop_token_ids=[], output_type="ids", progress=False)
    assert out.sequences[0].tolist() == argmax_loop(target, think, 8) and out.texts is None
    with pytest.raises(ValueError, match="one string"):
        pipe(prompt=["a", "b"], progress=False)


def test_progress_bar_configuration_survives(target, pipe):
    pipe.set_progress_bar_config(desc="mine", leave=False)
    run(pipe, prompt_ids(3), max_new_tokens=5)
    assert pipe.progress_bar_config["desc"] == "mine"
    out = pipe(input_ids=prompt_ids(3), max_new_tokens=5, stop_token_ids=[], output_type="ids", progress=True)
    assert out.sequences.shape == (1, 5) and pipe.progress_bar_config == {"desc": "mine", "leave": False}


# ---------------------------------------------------------------------------------------------
# the trained tiny draft
# ---------------------------------------------------------------------------------------------


def test_trained_tiny_draft_accepts_many_tokens_and_stays_lossless():
    from transformers import AutoModelForCausalLM

    target_dir, draft_dir = os.path.join(ASSETS, "tiny_dflash_target"), os.path.join(ASSETS, "tiny_dflash_draft")
    target = AutoModelForCausalLM.from_pretrained(target_dir, local_files_only=True).eval()
    trained = DFlashDraftModel.from_pretrained(draft_dir)
    torch.manual_seed(0)
    untrained = DFlashDraftModel(trained.config).eval()
    with open(os.path.join(draft_dir, "prompts.jsonl")) as f:
        prompts = [json.loads(line)["input_ids"] for line in f if line.strip()][:4]
    refs = [target.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.int64),
                            max_new_tokens=40, do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    means = {}
    for name, draft in (("trained", trained), ("untrained", untrained)):
        pipe = DFlashPipeline(draft, target, backend="torch")
        lengths = []
        for p, ref in zip(prompts, refs):
            out = run(pipe, torch.tensor([p]), max_new_tokens=40)
            assert out.sequences[0].tolist() == ref, name
            lengths += out.acceptance_lengths
        means[name] = sum(lengths) / len(lengths)
    assert means["untrained"] < 1.5
    assert means["trained"] > 3.0, means


def test_from_pretrained_loads_both_models_from_local_directories():
    target_dir, draft_dir = os.path.join(ASSETS, "tiny_dflash_target"), os.path.join(ASSETS, "tiny_dflash_draft")
    pipe = DFlashPipeline.from_pretrained(draft_dir, target_dir, dtype=torch.float64, backend="torch")
    assert pipe.draft_model.dtype == torch.float64 and pipe.tokenizer is None
    ids = torch.tensor([[5, 9, 33]])
    out = run(pipe, ids, max_new_tokens=10)
    assert out.sequences[0].tolist() == argmax_loop(pipe.target_model, ids, 10)
    with pytest.raises(ValueError, match="local"):
        DFlashPipeline.from_pretrained(draft_dir, os.path.join(ASSETS, "missing"))
