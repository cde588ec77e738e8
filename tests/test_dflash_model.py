"""DFlashDraftModel: the z-lab config and checkpoint layout, its forward, cache and packed training forward.

* Config: ``block_size`` at the top level or in ``dflash_config``; z-lab's default layer ids;
  every loader check raises the documented error naming the problem.
* Weights: exactly the z-lab key names (no ``model.`` prefix, no embeddings, no head), strict.
* Forward: equals the draft written out as explicit math in this file (context keys/values from
  ``hidden_norm(fc(features))`` with no input norm, ``k_norm`` / ``q_norm``, RoPE at absolute
  positions, non-causal, queries from the noise block only), in float64.
* Features are ``hidden_states[i + 1]``: the outputs of decoder layer ``i`` (checked with hooks).
* Cache: chunked calls equal one call; ``extend_cache`` adds exactly what a forward would.
* Packed training forward (``anchors``): each kept block equals the inference forward on the
  features before its anchor (float64, torch backend; triton under the interpreter once).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from ddiff.pipelines import DFlashDraftModel
from ddiff.pipelines.dflash_model import (DFlashDraftConfig, build_target_layer_ids, check_draft_target,
                                          target_features)

H, HEADS, KV, D = 32, 2, 1, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def draft_config(**overrides) -> dict:
    cfg = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": H, "num_hidden_layers": 2,
           "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": D, "intermediate_size": 48,
           "num_target_layers": 5, "block_size": 4, "vocab_size": 96, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "dflash_config": {"mask_token_id": 95, "target_layer_ids": [0, 3]}}
    cfg.update(overrides)
    return cfg


def tiny_target(layers: int = 5, vocab: int = 96, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=H, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=D, max_position_embeddings=256,
                      **overrides)
    return Qwen3ForCausalLM(cfg).to(torch.float64).eval()


def random_draft(seed: int = 0, **overrides) -> DFlashDraftModel:
    torch.manual_seed(seed)
    draft = DFlashDraftModel(draft_config(**overrides)).to(torch.float64).eval()
    with torch.no_grad():  # non-trivial norm weights, so a missing or misplaced norm shows
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return draft


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


def test_build_target_layer_ids_matches_zlab_spacing():
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert build_target_layer_ids(36, 1) == [18]
    assert build_target_layer_ids(28, 1) == [14]
    assert build_target_layer_ids(32, 5) == [1, 8, 15, 22, 29]  # the Qwen3.5-4B draft's ids


def test_config_block_size_top_level_or_nested():
    top = DFlashDraftConfig.from_dict(draft_config())
    nested_cfg = draft_config(dflash_config={"mask_token_id": 95, "target_layer_ids": [0, 3], "block_size": 4})
    nested_cfg.pop("block_size")
    nested = DFlashDraftConfig.from_dict(nested_cfg)
    assert top.block_size == nested.block_size == 4
    assert nested.to_dict()["block_size"] == 4
    with pytest.raises(ValueError, match="disagree"):
        DFlashDraftConfig.from_dict(draft_config(dflash_config={"mask_token_id": 95, "block_size": 8}))
    missing = draft_config()
    missing.pop("block_size")
    with pytest.raises(ValueError, match="block_size"):
        DFlashDraftConfig.from_dict(missing)
    with pytest.raises(ValueError, match="block_size"):
        DFlashDraftConfig.from_dict(draft_config(block_size=1))


def test_config_defaults():
    cfg = draft_config(num_target_layers=36, num_hidden_layers=5, dflash_config={"mask_token_id": 95})
    cfg.pop("head_dim")
    cfg.pop("num_key_value_heads")
    c = DFlashDraftConfig.from_dict(cfg)
    assert c.target_layer_ids == (1, 9, 17, 25, 33)
    assert c.head_dim == H // HEADS and c.num_key_value_heads == HEADS
    assert c.to_dict()["dflash_config"]["target_layer_ids"] == [1, 9, 17, 25, 33]
    rope5 = draft_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    rope5.pop("rope_theta")
    assert DFlashDraftConfig.from_dict(rope5).rope_theta == 1e6


@pytest.mark.parametrize("overrides, words", [
    ({"layer_types": ["sliding_attention", "full_attention"]}, ["sliding_attention"]),
    ({"layer_types": ["full_attention", "linear_attention"]}, ["linear_attention"]),
    ({"use_sliding_window": True, "sliding_window": 64}, ["use_sliding_window"]),
    ({"dflash_config": {"mask_token_id": 95, "fc_layernorm": True}}, ["fc_layernorm"]),
    ({"dflash_config": {"mask_token_id": 95, "draft_arch": "x", "sliding_window": 3}},
     ["draft_arch", "sliding_window"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["yarn"]),
    ({"hidden_act": "gelu"}, ["gelu"]),
])
def test_config_unsupported_features_raise_not_implemented(overrides, words):
    with pytest.raises(NotImplementedError) as info:
        DFlashDraftConfig.from_dict(draft_config(**overrides))
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("overrides, match", [
    ({"dflash_config": {"mask_token_id": 95, "target_layer_ids": [0, 4]}}, "target layer id 4"),  # L - 1
    ({"dflash_config": {"mask_token_id": 95, "target_layer_ids": [-1]}}, "target layer id -1"),
    ({"dflash_config": {"mask_token_id": 95, "target_layer_ids": []}}, "empty"),
    ({"dflash_config": {"mask_token_id": 96}}, "mask_token_id"),
    ({"dflash_config": {"target_layer_ids": [0]}}, "mask_token_id"),
    ({"num_attention_heads": 3, "num_key_value_heads": 2}, "multiple"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
])
def test_config_bad_values_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        DFlashDraftConfig.from_dict(draft_config(**overrides))


# ---------------------------------------------------------------------------------------------
# weights and checkpoints
# ---------------------------------------------------------------------------------------------


def test_state_dict_is_the_zlab_layout():
    draft = DFlashDraftModel(draft_config())
    shapes = {k: tuple(v.shape) for k, v in draft.state_dict().items()}
    expected = {"fc.weight": (H, 2 * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(2):
        p = f"layers.{i}."
        expected.update({
            p + "self_attn.q_proj.weight": (HEADS * D, H), p + "self_attn.k_proj.weight": (KV * D, H),
            p + "self_attn.v_proj.weight": (KV * D, H), p + "self_attn.o_proj.weight": (H, HEADS * D),
            p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
            p + "mlp.gate_proj.weight": (48, H), p + "mlp.up_proj.weight": (48, H), p + "mlp.down_proj.weight": (H, 48),
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        })
    assert shapes == expected


def test_load_state_dict_is_strict_with_clear_errors():
    draft = DFlashDraftModel(draft_config())
    state = {k: v.clone() for k, v in random_draft().state_dict().items()}
    draft.load_state_dict(state, strict=True)
    bad = dict(state)
    bad.pop("layers.1.self_attn.k_norm.weight")
    with pytest.raises(ValueError, match="missing keys.*layers.1.self_attn.k_norm.weight"):
        draft.load_state_dict(bad)
    bad = dict(state, **{"model.embed_tokens.weight": torch.zeros(96, H)})
    with pytest.raises(ValueError, match="unexpected keys.*model.embed_tokens.weight"):
        draft.load_state_dict(bad)
    bad = dict(state, **{"fc.weight": torch.zeros(H, 3 * H)})
    with pytest.raises(ValueError, match="shape mismatches.*fc.weight"):
        draft.load_state_dict(bad)


def test_save_and_from_pretrained_round_trip(tmp_path):
    draft = random_draft()
    draft.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["block_size"] == 4 and saved["dflash_config"] == {"mask_token_id": 95, "target_layer_ids": [0, 3]}
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "model.safetensors")) == set(draft.state_dict())
    loaded = DFlashDraftModel.from_pretrained(str(tmp_path))
    assert not loaded.training and loaded.dtype == torch.float64
    for k, v in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    as_fp32 = DFlashDraftModel.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert as_fp32.dtype == torch.float32
    with pytest.raises(ValueError, match="local"):
        DFlashDraftModel.from_pretrained(str(tmp_path / "nope"))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        DFlashDraftModel.from_pretrained(str(tmp_path))


def test_from_pretrained_reads_a_sharded_checkpoint(tmp_path):
    from safetensors.torch import save_file

    draft = random_draft()
    state = {k: v.contiguous() for k, v in draft.state_dict().items()}
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, tmp_path / name)
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: name for name, part in halves.items() for k in part}}, f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(draft_config(), f)
    loaded = DFlashDraftModel.from_pretrained(str(tmp_path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------------------------------------
# forward semantics
# ---------------------------------------------------------------------------------------------


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta=10000.0):
    # x [T, heads, D], pos [T]; pairs (j, j + D/2) rotate by pos * theta^(-2j/D)
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    ang = pos.to(torch.float64)[:, None] * freq
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def explicit_draft(state, noise, feats, ctx_pos, noise_pos, layers=2):
    """The DFlash draft as explicit math on one sequence (float64): noise [q, H], feats [c, F]."""
    ctx = _rms(feats @ state["fc.weight"].T, state["hidden_norm.weight"])
    x = noise
    for i in range(layers):
        p = lambda n: state[f"layers.{i}.{n}"]  # noqa: E731
        h = _rms(x, p("input_layernorm.weight"))
        kv_in = torch.cat([ctx, h])
        pos = torch.cat([ctx_pos, noise_pos])
        q = _rms((h @ p("self_attn.q_proj.weight").T).view(-1, HEADS, D), p("self_attn.q_norm.weight"))
        q = _rope(q, noise_pos)
        k = _rope(_rms((kv_in @ p("self_attn.k_proj.weight").T).view(-1, KV, D), p("self_attn.k_norm.weight")), pos)
        v = (kv_in @ p("self_attn.v_proj.weight").T).view(-1, KV, D)
        heads = []
        for hq in range(HEADS):
            kvh = hq // (HEADS // KV)
            scores = q[:, hq] @ k[:, kvh].T / D**0.5  # no mask: every noise query sees all keys
            heads.append(torch.softmax(scores, -1) @ v[:, kvh])
        x = x + torch.cat(heads, -1) @ p("self_attn.o_proj.weight").T
        h = _rms(x, p("post_attention_layernorm.weight"))
        mlp = F.silu(h @ p("mlp.gate_proj.weight").T) * (h @ p("mlp.up_proj.weight").T)
        x = x + mlp @ p("mlp.down_proj.weight").T
    return _rms(x, state["norm.weight"])


def test_forward_equals_explicit_math():
    draft = random_draft()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 4, H, generator=g, dtype=torch.float64)
    feats = torch.randn(1, 7, 2 * H, generator=g, dtype=torch.float64)
    pos = torch.arange(5, 16)[None]  # context at 5..11, noise at 12..15
    got = draft(noise_embedding=noise, target_hidden=feats, position_ids=pos)
    want = explicit_draft(draft.state_dict(), noise[0], feats[0], pos[0, :7], pos[0, 7:])
    torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-10)
    # no context: the block attends to itself only
    got = draft(noise_embedding=noise, position_ids=pos[:, 7:])
    want = explicit_draft(draft.state_dict(), noise[0], feats[0, :0], pos[0, :0], pos[0, 7:])
    torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-10)


def test_target_features_are_decoder_layer_outputs():
    target = tiny_target()
    outputs = {}
    def keep(i):
        return lambda module, args, out: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)

    hooks = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(target.model.layers)]
    try:
        ids = torch.randint(0, 95, (1, 6))
        with torch.no_grad():
            hs = target(ids, output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    feats = target_features(hs, [0, 3])
    torch.testing.assert_close(feats, torch.cat([outputs[0], outputs[3]], dim=-1), rtol=0, atol=0)


def _cache():
    from transformers import DynamicCache

    return DynamicCache()


def test_cache_calls_equal_one_call_and_extend_cache_matches_forward():
    draft = random_draft()
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(1, 9, 2 * H, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 4, H, generator=g, dtype=torch.float64)
    full = draft(noise_embedding=noise, target_hidden=feats, position_ids=torch.arange(13)[None])
    cache = _cache()
    draft(noise_embedding=noise, target_hidden=feats[:, :5], position_ids=torch.arange(9)[None], past_key_values=cache)
    assert cache.get_seq_length() == 9
    cache.crop(-4)  # drop the noise rows, keep the context
    out = draft(noise_embedding=noise, target_hidden=feats[:, 5:], position_ids=torch.arange(5, 13)[None],
                past_key_values=cache)
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)
    ext = _cache()
    draft.extend_cache(feats[:, :6], torch.arange(6)[None], ext)
    draft.extend_cache(feats[:, 6:], torch.arange(6, 9)[None], ext)
    assert ext.get_seq_length() == 9
    out = draft(noise_embedding=noise, position_ids=torch.arange(9, 13)[None], past_key_values=ext)
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)
    # default positions continue after the cache
    ext.crop(-4)
    torch.testing.assert_close(draft(noise_embedding=noise, past_key_values=ext), full, rtol=1e-10, atol=1e-10)


def _packed_case(seed=3, S=12, bs=4):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.tensor([[0, 7, 3, 12, 7], [5, 1, 1, 9, 11]])
    keep = torch.tensor([[True, True, False, True, True], [True, True, True, False, True]])
    B, N = anchors.shape
    feats = torch.randn(B, S, 2 * H, generator=g, dtype=torch.float64)
    noise = torch.randn(B, N * bs, H, generator=g, dtype=torch.float64)
    pos = torch.cat([torch.arange(S).expand(B, S), (anchors[:, :, None] + torch.arange(bs)).reshape(B, -1)], 1)
    return anchors, keep, feats, noise, pos


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_forward_equals_inference_forward_per_block(backend):
    draft = random_draft()
    anchors, keep, feats, noise, pos = _packed_case()
    if backend == "triton":  # the kernels take fp32: one small interpreted check
        draft, feats, noise = draft.float(), feats.float(), noise.float()
    bs = 4
    packed = draft(noise_embedding=noise, target_hidden=feats, position_ids=pos, anchors=anchors, keep=keep,
                   attention_backend=backend)
    tol = dict(rtol=1e-10, atol=1e-10) if backend == "torch" else dict(rtol=2e-5, atol=2e-5)
    for b in range(anchors.shape[0]):
        for n in range(anchors.shape[1]):
            if not keep[b, n]:
                continue
            a = int(anchors[b, n])
            rows = slice(n * bs, (n + 1) * bs)
            solo = draft(noise_embedding=noise[b:b + 1, rows], target_hidden=feats[b:b + 1, :a],
                         position_ids=torch.arange(a + bs)[None])
            torch.testing.assert_close(packed[b:b + 1, rows], solo, **tol)


def test_packed_forward_context_is_strictly_before_the_anchor_and_the_block_is_bidirectional():
    draft = random_draft()
    anchors, keep, feats, noise, pos = _packed_case()
    base = draft(noise_embedding=noise, target_hidden=feats, position_ids=pos, anchors=anchors, keep=keep,
                 attention_backend="torch")
    block, a = 1, 7  # row 0, anchor 7: sees context 0..6, not 7
    rows = slice(block * 4, block * 4 + 4)
    at_anchor = feats.clone()
    at_anchor[0, a] += 1.0
    same = draft(noise_embedding=noise, target_hidden=at_anchor, position_ids=pos, anchors=anchors, keep=keep,
                 attention_backend="torch")
    torch.testing.assert_close(same[0, rows], base[0, rows], rtol=0, atol=1e-12)
    before = feats.clone()
    before[0, a - 1] += 1.0
    moved = draft(noise_embedding=noise, target_hidden=before, position_ids=pos, anchors=anchors, keep=keep,
                  attention_backend="torch")
    assert (moved[0, rows] - base[0, rows]).abs().max() > 1e-6
    last = noise.clone()
    last[0, block * 4 + 3] += 1.0  # the block's last token changes its first row: no causal mask
    moved = draft(noise_embedding=last, target_hidden=feats, position_ids=pos, anchors=anchors, keep=keep,
                  attention_backend="torch")
    assert (moved[0, block * 4] - base[0, block * 4]).abs().max() > 1e-6
    other = base.clone()
    torch.testing.assert_close(moved[0, :4], other[0, :4], rtol=0, atol=1e-12)  # block 0 is untouched


def test_forward_input_checks():
    draft = random_draft()
    noise = torch.zeros(1, 4, H, dtype=torch.float64)
    with pytest.raises(ValueError, match="noise_embedding"):
        draft(noise_embedding=torch.zeros(1, 4, H + 1))
    with pytest.raises(ValueError, match="target_hidden"):
        draft(noise_embedding=noise, target_hidden=torch.zeros(1, 3, H))
    with pytest.raises(ValueError, match="position_ids"):
        draft(noise_embedding=noise, position_ids=torch.arange(3)[None])
    with pytest.raises(ValueError, match="multiple"):
        draft(noise_embedding=noise, target_hidden=torch.zeros(1, 3, 2 * H, dtype=torch.float64),
              anchors=torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="past_key_values"):
        draft(noise_embedding=noise, target_hidden=torch.zeros(1, 3, 2 * H, dtype=torch.float64),
              anchors=torch.zeros(1, 1, dtype=torch.int64), past_key_values=_cache())
    with pytest.raises(ValueError, match="keep"):
        draft(noise_embedding=noise, keep=torch.ones(1, 1, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# draft / target checks
# ---------------------------------------------------------------------------------------------


def test_check_draft_target():
    target = tiny_target()
    check_draft_target(random_draft(), target)
    with pytest.raises(ValueError, match="num_target_layers=5.*has 4"):
        check_draft_target(random_draft(), tiny_target(layers=4))
    with pytest.raises(ValueError, match="vocab_size 96"):
        check_draft_target(random_draft(), tiny_target(vocab=100))
    with pytest.raises(ValueError, match="mask_token_id 99"):
        check_draft_target(random_draft(vocab_size=None, dflash_config={"mask_token_id": 99,
                                                                         "target_layer_ids": [0, 3]}), target)
    wide = draft_config(hidden_size=64, head_dim=16, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_size"):
        check_draft_target(DFlashDraftModel(wide), target)
    with pytest.raises(TypeError, match="DFlashDraftModel"):
        check_draft_target(torch.nn.Linear(2, 2), target)


def test_qwen3_8b_b16_layout_on_the_meta_device():
    """The published Qwen3-8B-DFlash-b16 config (its config.json fields) against a Qwen3-8B-shaped target."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = {"architectures": ["DFlashDraftModel"], "attention_bias": False, "attention_dropout": 0.0,
              "auto_map": {"AutoModel": "dflash.DFlashDraftModel"}, "block_size": 16, "bos_token_id": 151643,
              "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
              "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
              "initializer_range": 0.02, "intermediate_size": 12288, "layer_types": ["full_attention"] * 5,
              "max_position_embeddings": 40960, "max_window_layers": 5, "model_type": "qwen3",
              "num_attention_heads": 32, "num_hidden_layers": 5, "num_key_value_heads": 8, "num_target_layers": 36,
              "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
              "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
    with torch.device("meta"):
        draft = DFlashDraftModel(config)
        target = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                              num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                              head_dim=128))
    assert draft.block_size == 16 and draft.mask_token_id == 151669 and draft.target_layer_ids == [1, 9, 17, 25, 33]
    assert tuple(draft.fc.weight.shape) == (4096, 5 * 4096)
    assert tuple(draft.layers[0].self_attn.k_proj.weight.shape) == (8 * 128, 4096)
    assert len(draft.state_dict()) == 3 + 5 * 11
    check_draft_target(draft, target)
