"""The DFlash draft model in the z-lab checkpoint layout (``DFlashDraftModel``).

A DFlash draft is a small stack of Qwen3-style decoder layers that predicts a whole block of
tokens at once. It has no embeddings and no LM head of its own: it reads the target's token
embeddings and writes hidden states that the target's ``lm_head`` turns into logits.

Context features
    For each layer id ``i`` of ``target_layer_ids`` the target feature is
    ``hidden_states[i + 1]`` of the target, the *output* of decoder layer ``i`` (entry 0 is the
    embedding output; the last entry is after the final norm, hence ids in ``[0, L - 2]``). The
    chosen features are concatenated and projected once per call,
    ``ctx = hidden_norm(fc(features))``, and ``ctx`` serves as extra keys and values in every
    draft layer: layer ``l`` uses ``k_norm(k_proj_l(ctx))`` and ``v_proj_l(ctx)`` (no input
    norm), so context keys and values do not depend on the layer's input.

Noise block
    Queries come only from the noise block (``[last committed token, mask x (bs - 1)]`` embedded
    by the target), with ``q_norm`` and RoPE at absolute positions; keys are
    ``[context | noise]``. At inference the attention is non-causal with no mask. In training
    many blocks are packed into one call and ``ddiff.anchor_attention`` gives block ``b`` the
    context strictly before its anchor plus its own block (bidirectional).

Checkpoint (``config.json`` + ``model.safetensors``, keys without a ``model.`` prefix)::

    fc.weight                [H, len(target_layer_ids) * H]
    hidden_norm.weight, norm.weight
    layers.{i}.self_attn.{q,k,v,o}_proj.weight, layers.{i}.self_attn.{q,k}_norm.weight
    layers.{i}.mlp.{gate,up,down}_proj.weight
    layers.{i}.input_layernorm.weight, layers.{i}.post_attention_layernorm.weight

Loading never runs remote code: the architecture is this module's.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddiff.ops.attention import anchor_attention

Tensor = torch.Tensor

__all__ = [
    "DFlashDraftConfig",
    "DFlashDraftModel",
    "build_target_layer_ids",
    "check_draft_target",
    "target_features",
]

#: The ``dflash_config`` options this implementation understands; any other raises.
DFLASH_OPTIONS = ("block_size", "mask_token_id", "target_layer_ids")
_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """z-lab's default feature layers: ``[L // 2]`` for one, else ``round(1 + i (L - 4) / (n - 1))``.

    >>> build_target_layer_ids(36, 5)
    [1, 9, 17, 25, 33]
    """
    if num_draft_layers < 1:
        raise ValueError(f"`num_draft_layers` must be >= 1, got {num_draft_layers}.")
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [int(round(1 + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]


def _int(cfg: Mapping, key: str, default=None, minimum: int = 1) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise ValueError(f"the DFlash config needs `{key}`.")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"the DFlash config's `{key}` must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"the DFlash config's `{key}` must be >= {minimum}, got {value}.")
    return int(value)


def _bool(cfg: Mapping, key: str) -> bool:
    """A boolean field (absent or null: False); a string such as ``"false"`` is a ``TypeError``
    naming the field, never truthy."""
    value = cfg.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise TypeError(f"the DFlash config's `{key}` must be true or false (a JSON boolean), got {value!r}.")
    return value


def _real(cfg: Mapping, key: str, default: float, *, positive: bool) -> float:
    """A finite number field: ``TypeError`` naming it for a non-number (a string, a bool),
    ``ValueError`` for NaN / inf, a negative value, or 0 when ``positive``."""
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"the DFlash config's `{key}` must be a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"the DFlash config's `{key}` must be a finite {'positive' if positive else 'non-negative'} "
                         f"number, got {value!r}.")
    return value


def _rope_theta(cfg: Mapping) -> float:
    """The RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    for source in (params, scaling):
        if source is None:
            continue
        if not isinstance(source, Mapping):
            raise TypeError(f"the DFlash config's rope settings must be a dict, got {source!r}.")
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise NotImplementedError(f"DFlash drafts with RoPE type {kind!r} are not supported (only 'default').")
        theta = source.get("rope_theta", theta)
    theta = 10000.0 if theta is None else theta
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not theta > 0:
        raise ValueError(f"the DFlash config's `rope_theta` must be a positive number, got {theta!r}.")
    return float(theta)


@dataclass(frozen=True)
class DFlashDraftConfig:
    """A validated z-lab draft ``config.json``; ``raw`` keeps every original key for saving.

    Built with :meth:`from_dict`, which applies the z-lab defaults (``head_dim = H / heads``,
    ``num_key_value_heads = heads``, ``target_layer_ids = build_target_layer_ids(L, layers)``)
    and raises ``ValueError`` on inconsistent values and ``NotImplementedError`` on features this
    implementation does not have (sliding-window or other non-``full_attention`` layers, RoPE
    scaling, an activation other than SiLU, unknown ``dflash_config`` options).

    Every field is checked by type and named in the error: integer fields must be JSON integers
    (``TypeError`` otherwise); ``attention_bias`` and ``use_sliding_window`` must be JSON booleans
    or null (a string such as ``"false"`` is a ``TypeError``, never truthy); ``rms_norm_eps``
    (positive) and ``initializer_range`` (non-negative) must be finite numbers (``TypeError`` for a
    string, ``ValueError`` for NaN, inf or a value out of range; null means the default);
    ``layer_types`` and ``dflash_config.target_layer_ids`` must be lists.
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_target_layers: int
    target_layer_ids: tuple
    block_size: int
    mask_token_id: int
    vocab_size: Optional[int]
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    initializer_range: float
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "DFlashDraftConfig":
        if hasattr(config, "to_dict") and not isinstance(config, Mapping):
            config = config.to_dict()  # a transformers PretrainedConfig
        if not isinstance(config, Mapping):
            raise TypeError(f"`config` must be a dict (the draft's config.json), got {type(config).__name__}.")
        cfg = dict(config)
        dflash = cfg.get("dflash_config") or {}
        if not isinstance(dflash, Mapping):
            raise TypeError(f"`dflash_config` must be a dict, got {dflash!r}.")
        unknown = sorted(set(dflash) - set(DFLASH_OPTIONS))
        if unknown:
            raise NotImplementedError(
                f"unsupported `dflash_config` option(s) {unknown}; this implementation knows {list(DFLASH_OPTIONS)}."
            )

        hidden = _int(cfg, "hidden_size")
        layers = _int(cfg, "num_hidden_layers")
        heads = _int(cfg, "num_attention_heads")
        kv_heads = _int(cfg, "num_key_value_heads", heads)
        if heads % kv_heads:
            raise ValueError(f"`num_attention_heads` ({heads}) must be a multiple of "
                             f"`num_key_value_heads` ({kv_heads}).")
        if cfg.get("head_dim") is None and hidden % heads:
            raise ValueError(f"`hidden_size` ({hidden}) is not a multiple of `num_attention_heads` ({heads}); "
                             "give `head_dim`.")
        head_dim = _int(cfg, "head_dim", hidden // heads)
        intermediate = _int(cfg, "intermediate_size")
        num_target = _int(cfg, "num_target_layers", minimum=2)

        layer_types = cfg.get("layer_types")
        if layer_types is not None:
            if not isinstance(layer_types, (list, tuple)) or not all(isinstance(t, str) for t in layer_types):
                raise TypeError(f"the DFlash config's `layer_types` must be a list of strings, got {layer_types!r}.")
            layer_types = list(layer_types)
            if len(layer_types) != layers:
                raise ValueError(f"`layer_types` has {len(layer_types)} entries but `num_hidden_layers` is {layers}.")
            other = sorted({t for t in layer_types if t != "full_attention"})
            if other:
                raise NotImplementedError(f"DFlash draft layers of type {other} are not supported "
                                          "(only 'full_attention').")
        if _bool(cfg, "use_sliding_window"):
            raise NotImplementedError("DFlash drafts with `use_sliding_window=true` are not supported "
                                      "(only 'full_attention' layers).")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"DFlash drafts with `hidden_act={act!r}` are not supported (only 'silu').")

        top_bs, inner_bs = cfg.get("block_size"), dflash.get("block_size")
        if top_bs is not None and inner_bs is not None and top_bs != inner_bs:
            raise ValueError(f"`block_size` ({top_bs}) and `dflash_config.block_size` ({inner_bs}) disagree.")
        block = _int({"block_size": top_bs if top_bs is not None else inner_bs}, "block_size", minimum=2)

        vocab = cfg.get("vocab_size")
        if vocab is not None:
            vocab = _int(cfg, "vocab_size")
        mask_id = _int(dflash, "mask_token_id", minimum=0) if "mask_token_id" in dflash else None
        if mask_id is None:
            raise ValueError("the DFlash config needs `dflash_config.mask_token_id`.")
        if vocab is not None and mask_id >= vocab:
            raise ValueError(f"`dflash_config.mask_token_id` {mask_id} is outside the vocabulary of {vocab}.")

        ids = dflash.get("target_layer_ids")
        if ids is not None and not isinstance(ids, (list, tuple)):
            raise TypeError(f"the DFlash config's `dflash_config.target_layer_ids` must be a list of ints, "
                            f"got {ids!r}.")
        ids = build_target_layer_ids(num_target, layers) if ids is None else list(ids)
        if not ids:
            raise ValueError("`dflash_config.target_layer_ids` is empty.")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i <= num_target - 2:
                raise ValueError(
                    f"target layer id {i!r} must be an int in [0, num_target_layers - 2 = {num_target - 2}]: feature "
                    f"i is hidden_states[i + 1], and the last hidden state is after the final norm."
                )
        eps = _real(cfg, "rms_norm_eps", 1e-6, positive=True)
        init = _real(cfg, "initializer_range", 0.02, positive=False)
        attention_bias = _bool(cfg, "attention_bias")
        raw = dict(cfg)
        raw["block_size"] = block
        raw["dflash_config"] = {**dict(dflash), "mask_token_id": mask_id, "target_layer_ids": [int(i) for i in ids]}
        raw["dflash_config"].pop("block_size", None)
        return cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                   num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
                   num_target_layers=num_target, target_layer_ids=tuple(int(i) for i in ids), block_size=block,
                   mask_token_id=mask_id, vocab_size=vocab, rms_norm_eps=float(eps), rope_theta=_rope_theta(cfg),
                   attention_bias=attention_bias, initializer_range=init, raw=raw)

    def to_dict(self) -> dict:
        """The z-lab ``config.json`` (original keys kept, ``block_size`` at the top level)."""
        return json.loads(json.dumps(self.raw))


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: normalise in fp32 (float64 stays float64), cast back, scale by ``weight``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos, sin`` ``[B, T, head_dim]`` for absolute positions, computed in fp32 as transformers does."""
    compute = torch.promote_types(dtype, torch.float32)
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).to(compute) / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    freqs = position_ids.to(compute)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on ``x`` ``[B, heads, T, D]`` with ``cos``/``sin`` ``[B, T, D]`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class DFlashAttention(nn.Module):
    def __init__(self, config: DFlashDraftConfig, layer_idx: int):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        self.scale = D**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=bias)
        self.q_norm = RMSNorm(D, config.rms_norm_eps)
        self.k_norm = RMSNorm(D, config.rms_norm_eps)

    def context_kv(self, ctx: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (normed, rotated) and values ``[B, Hkv, T, D]`` of projected context ``ctx``."""
        B, T, _ = ctx.shape
        k = self.k_norm(self.k_proj(ctx).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(ctx).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return _rotate(k, cos, sin).to(v.dtype), v

    def forward(self, x: Tensor, ctx: Optional[Tensor], cos: Tensor, sin: Tensor, cache, anchors, keep,
                backend: str) -> Tensor:
        B, q_len, _ = x.shape
        kv_in = x if ctx is None or ctx.shape[1] == 0 else torch.cat([ctx, x], dim=1)
        k, v = self.context_kv(kv_in, cos, sin)
        q = self.q_norm(self.q_proj(x).view(B, q_len, self.num_heads, self.head_dim)).transpose(1, 2)
        # Under autocast the norms return fp32 while the projections return bf16/fp16: attend in the
        # projections' dtype, as SDPA's autocast would.
        q = _rotate(q, cos[:, -q_len:], sin[:, -q_len:]).to(v.dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if anchors is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
        else:
            bs = q_len // anchors.shape[1]
            out = anchor_attention(q, k, v, anchors, context_len=k.shape[2] - q_len, block_size=bs, keep=keep,
                                   scale=self.scale, backend=backend)
        return self.o_proj(out.transpose(1, 2).reshape(B, q_len, self.num_heads * self.head_dim))


class DFlashMLP(nn.Module):
    def __init__(self, config: DFlashDraftConfig):
        super().__init__()
        H, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: DFlashDraftConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DFlashAttention(config, layer_idx)
        self.mlp = DFlashMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, ctx, cos, sin, cache, anchors, keep, backend):
        x = x + self.self_attn(self.input_layernorm(x), ctx, cos, sin, cache, anchors, keep, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def target_features(hidden_states: Sequence[Tensor], layer_ids: Sequence[int]) -> Tensor:
    """Concatenate ``hidden_states[i + 1]`` (decoder layer ``i``'s output) for ``i`` in ``layer_ids``."""
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)


class DFlashDraftModel(nn.Module):
    r"""A DFlash block-diffusion draft (z-lab ``DFlashDraftModel`` layout, full attention only).

    Args:
        config: the draft's ``config.json`` as a dict (or a :class:`DFlashDraftConfig`); see
            :meth:`DFlashDraftConfig.from_dict` for what is checked.

    Two modes share the weights:

    * **Inference** (``anchors=None``): ``noise_embedding`` ``[B, q_len, H]`` (the embedded block)
      attends, without a mask, to ``[cached K/V | context | noise]``; the K/V of this call's context
      and noise are appended to ``past_key_values`` when one is given (the caller crops the noise
      off afterwards). ``position_ids`` ``[B, ctx_len + q_len]`` are the absolute positions of this
      call's context rows then noise rows (default: continuing after the cache).
    * **Packed training** (``anchors`` ``[B, N]``): ``noise_embedding`` ``[B, N * bs, H]`` holds N
      blocks, ``target_hidden`` ``[B, S, F]`` the whole sequence's features and ``position_ids``
      ``[B, S + N * bs]`` their positions; block ``b`` sees the context positions ``< anchors[b]``
      and its own block, through :func:`ddiff.anchor_attention` with ``attention_backend``.
      ``keep`` ``[B, N]`` (bool) drops blocks (their rows get no attention output). Each kept
      block's output equals the inference forward on the features before its anchor.

    Returns the final-normed hidden states ``[B, q_len, H]``; the target's ``lm_head`` gives logits.

    Example:
        >>> draft = DFlashDraftModel.from_pretrained("/models/Qwen3-8B-DFlash-b16", dtype=torch.bfloat16,
        ...                                          device="cuda")
        >>> feats = target_features(target(ids, output_hidden_states=True).hidden_states, draft.target_layer_ids)
        >>> block = torch.tensor([[last_token] + [draft.mask_token_id] * 15], device="cuda")
        >>> pos = torch.arange(ids.shape[1] + 16, device="cuda")[None]
        >>> hidden = draft(noise_embedding=target.get_input_embeddings()(block), target_hidden=feats, position_ids=pos)
        >>> proposal = target.get_output_embeddings()(hidden[:, 1:]).argmax(-1)
    """

    def __init__(self, config):
        super().__init__()
        self.config = config if isinstance(config, DFlashDraftConfig) else DFlashDraftConfig.from_dict(config)
        c = self.config
        self.layers = nn.ModuleList(DFlashDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.fc = nn.Linear(len(c.target_layer_ids) * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.reset_parameters()

    # -- properties -----------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self.config.target_layer_ids)

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def reset_parameters(self) -> None:
        """transformers' initialisation: linear weights ~ N(0, initializer_range), biases 0, norms 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.config.initializer_range)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # -- forward --------------------------------------------------------------------------------
    def project_context(self, target_hidden: Tensor) -> Tensor:
        """``hidden_norm(fc(target_hidden))``: ``[B, T, len(ids) * H]`` features to ``[B, T, H]``."""
        return self.hidden_norm(self.fc(target_hidden))

    def _check(self, noise_embedding, target_hidden, position_ids, anchors, keep, past_key_values):
        H = self.config.hidden_size
        if not isinstance(noise_embedding, Tensor) or noise_embedding.dim() != 3 or noise_embedding.shape[-1] != H:
            raise ValueError(f"`noise_embedding` must be a [B, q_len, {H}] tensor, got "
                             f"{getattr(noise_embedding, 'shape', type(noise_embedding).__name__)}.")
        B, q_len = noise_embedding.shape[:2]
        ctx_len = 0
        if target_hidden is not None:
            F_dim = len(self.config.target_layer_ids) * H
            if not isinstance(target_hidden, Tensor) or target_hidden.dim() != 3 or target_hidden.shape[-1] != F_dim:
                raise ValueError(f"`target_hidden` must be a [B, ctx_len, {F_dim}] tensor (features of "
                                 f"{len(self.config.target_layer_ids)} target layers), got "
                                 f"{getattr(target_hidden, 'shape', type(target_hidden).__name__)}.")
            if target_hidden.shape[0] != B:
                raise ValueError(f"`target_hidden` has batch {target_hidden.shape[0]} but `noise_embedding` has {B}.")
            ctx_len = target_hidden.shape[1]
        if position_ids is not None:
            if not isinstance(position_ids, Tensor) or position_ids.dtype.is_floating_point or position_ids.dim() != 2:
                raise ValueError("`position_ids` must be an integer [B, ctx_len + q_len] tensor.")
            if position_ids.shape[1] != ctx_len + q_len or position_ids.shape[0] not in (1, B):
                raise ValueError(f"`position_ids` must have shape [{B} or 1, ctx_len + q_len = {ctx_len + q_len}], "
                                 f"got {tuple(position_ids.shape)}.")
        if anchors is not None:
            if past_key_values is not None:
                raise ValueError("the packed training forward (`anchors`) takes no `past_key_values`.")
            if target_hidden is None:
                raise ValueError("the packed training forward (`anchors`) needs `target_hidden`.")
            if not isinstance(anchors, Tensor) or anchors.dim() != 2 or anchors.shape[0] != B:
                raise ValueError(f"`anchors` must be a [B={B}, N] integer tensor.")
            N = anchors.shape[1]
            if N == 0 or q_len % N:
                raise ValueError(f"`noise_embedding` has {q_len} rows, not a multiple of N = {N} blocks.")
        elif keep is not None:
            raise ValueError("`keep` goes with `anchors` (the packed training forward).")

    def forward(
        self,
        noise_embedding: Tensor,
        target_hidden: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        past_key_values=None,
        *,
        anchors: Optional[Tensor] = None,
        keep: Optional[Tensor] = None,
        attention_backend: str = "auto",
    ) -> Tensor:
        self._check(noise_embedding, target_hidden, position_ids, anchors, keep, past_key_values)
        B, q_len = noise_embedding.shape[:2]
        ctx = None if target_hidden is None else self.project_context(target_hidden.to(self.dtype))
        x = noise_embedding.to(self.dtype)
        if position_ids is None:
            first = past_key_values.get_seq_length() if past_key_values is not None else 0
            total = q_len + (0 if ctx is None else ctx.shape[1])
            position_ids = torch.arange(first, first + total, device=x.device)[None]
        cos, sin = rotary_cos_sin(position_ids.expand(B, -1), self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, ctx, cos, sin, past_key_values, anchors, keep, attention_backend)
        return self.norm(x)

    @torch.no_grad()
    def extend_cache(self, target_hidden: Tensor, position_ids: Tensor, past_key_values) -> None:
        """Append the K/V of context features ``[B, T, F]`` at ``position_ids`` ``[B, T]`` to every layer.

        Context keys and values do not depend on a layer's input, so no layer runs: this is what a
        forward with this context would add to the cache, without the noise rows.
        """
        ctx = self.project_context(target_hidden.to(self.dtype))
        cos, sin = rotary_cos_sin(position_ids.expand(ctx.shape[0], -1), self.config.head_dim,
                                  self.config.rope_theta, ctx.dtype)
        for layer in self.layers:
            k, v = layer.self_attn.context_kv(ctx, cos, sin)
            past_key_values.update(k, v, layer.self_attn.layer_idx)

    # -- checkpoints ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype: Optional[torch.dtype] = None, device=None, *,
                        torch_dtype: Optional[torch.dtype] = None) -> "DFlashDraftModel":
        """Load ``config.json`` + ``model.safetensors`` (or a sharded index) from a local directory.

        Keys must match exactly (strict); a sharded checkpoint's tensors are each read from the file
        its ``model.safetensors.index.json`` maps them to, and no shard name may leave the directory
        (:func:`ddiff.pipelines.loading.load_checkpoint_weights`); nothing is downloaded and no
        remote code runs. ``dtype``
        (``torch_dtype`` is its deprecated name) defaults to the stored one. The model comes back
        in eval mode. Errors name the path, file or key at fault (see
        :mod:`ddiff.pipelines.loading`); the weights are checked against the config from the
        safetensors headers before any tensor is read.
        """
        from ddiff.pipelines.loading import (_with_context, check_weights_match, checkpoint_weight_shapes,
                                             load_checkpoint_weights, read_json, resolve_checkpoint_dir,
                                             resolve_dtype, weight_files)

        dtype = resolve_dtype(dtype, torch_dtype, caller="DFlashDraftModel.from_pretrained")
        path = resolve_checkpoint_dir(path, "DFlash draft (`path`)")
        config_file = os.path.join(path, "config.json")
        try:
            config = DFlashDraftConfig.from_dict(read_json(config_file, what="DFlash draft"))
        except (TypeError, ValueError, NotImplementedError) as e:
            if config_file in str(e):
                raise
            raise _with_context(e, config_file) from e
        files = weight_files(path)
        if not files:
            raise ValueError(f"{path} holds neither {_SAFETENSORS} nor {_SAFETENSORS_INDEX} (DFlash drafts load "
                             "safetensors only).")
        with torch.device("meta"):
            model = cls(config)
        source = files[0] if len(files) == 1 else os.path.join(path, _SAFETENSORS_INDEX)
        check_weights_match(model, checkpoint_weight_shapes(path), source=source, config_file=config_file)
        # sharded: each tensor from the file the index maps it to (never whole files merged)
        state = load_checkpoint_weights(path)
        model.load_state_dict(state, strict=True, assign=True)
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        return model.eval()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` with z-lab key names; with ``strict`` a ``ValueError`` lists
        missing / unexpected keys and shape mismatches."""
        if strict:
            own = self.state_dict()
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in sorted(set(own) & set(state_dict)) if tuple(state_dict[k].shape) != tuple(own[k].shape)]
            if missing or unexpected or shapes:
                parts = []
                if missing:
                    parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
                if unexpected:
                    parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
                if shapes:
                    parts.append(f"shape mismatches {shapes[:4]}")
                raise ValueError("the state dict does not match the DFlash draft layout: " + "; ".join(parts) + ".")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save_pretrained(self, directory, dtype: Optional[torch.dtype] = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` in the z-lab layout (``from_pretrained`` reads it).

        Atomic (:func:`ddiff.pipelines.loading.atomic_directory`): the files are written to a
        temporary directory and moved in, ``config.json`` last, so an interrupted save never
        leaves a directory that loads."""
        from safetensors.torch import save_file

        from ddiff.pipelines.loading import atomic_directory

        config = self.config.to_dict()
        state = {k: (v if dtype is None else v.to(dtype)).detach().contiguous().cpu()
                 for k, v in self.state_dict().items()}
        config["dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
        config.pop("torch_dtype", None)
        config.setdefault("architectures", ["DFlashDraftModel"])
        config.setdefault("model_type", "qwen3")
        with atomic_directory(directory) as tmp:
            save_file(state, os.path.join(tmp, _SAFETENSORS), metadata={"format": "pt"})
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")

    @classmethod
    def from_target_config(cls, target_config, num_layers: int, *, block_size: int = 16, mask_token_id: int,
                           target_layer_ids: Optional[Sequence[int]] = None, **overrides) -> "DFlashDraftModel":
        """A new (randomly initialised) draft shaped like the target's layers, z-lab style.

        ``target_config``: the target's transformers config (or dict); the draft copies its hidden
        size, heads, head dim, MLP width, norm eps and RoPE base, with ``num_layers`` layers;
        ``target_layer_ids`` default to :func:`build_target_layer_ids`. ``overrides`` replace
        config keys.
        """
        tc = target_config.to_dict() if hasattr(target_config, "to_dict") else dict(target_config)
        L = _int(tc, "num_hidden_layers")
        heads = _int(tc, "num_attention_heads")
        rope = tc.get("rope_parameters") or {}
        config = {
            "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
            "hidden_size": tc["hidden_size"], "intermediate_size": tc["intermediate_size"],
            "num_hidden_layers": num_layers, "num_attention_heads": heads,
            "num_key_value_heads": tc.get("num_key_value_heads") or heads,
            "head_dim": tc.get("head_dim") or tc["hidden_size"] // heads,
            "rms_norm_eps": tc.get("rms_norm_eps", 1e-6),
            "rope_theta": rope.get("rope_theta", tc.get("rope_theta", 10000.0)), "rope_scaling": None,
            "vocab_size": tc.get("vocab_size"), "max_position_embeddings": tc.get("max_position_embeddings"),
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
            "initializer_range": tc.get("initializer_range", 0.02),
            "layer_types": ["full_attention"] * num_layers, "tie_word_embeddings": False,
            "num_target_layers": L, "block_size": block_size,
            "dflash_config": {"mask_token_id": mask_token_id,
                              "target_layer_ids": list(target_layer_ids) if target_layer_ids is not None
                              else build_target_layer_ids(L, num_layers)},
        }
        config.update(overrides)
        return cls(config)


# ---------------------------------------------------------------------------------------------
# Draft / target compatibility
# ---------------------------------------------------------------------------------------------


def _rows(module) -> Optional[int]:
    weight = getattr(module, "weight", None)
    return None if weight is None else int(weight.shape[0])


def check_draft_target(draft, target) -> None:
    """Raise ``ValueError`` unless ``draft`` can run on ``target``'s features and embeddings.

    Checks: the target's layer count equals ``num_target_layers`` (so the layer ids, already in
    ``[0, num_target_layers - 2]``, are valid); hidden sizes match; the target's input embedding
    and output head have the draft's vocabulary (when the draft config states one) and contain
    the mask id.
    """
    draft = getattr(draft, "module", draft)  # DDP / accelerate wrappers
    if not isinstance(draft, DFlashDraftModel):
        raise TypeError(f"`draft_model` must be a DFlashDraftModel, got {type(draft).__name__}.")
    c = draft.config
    tc = getattr(target, "config", None)
    if tc is None or not callable(getattr(target, "get_input_embeddings", None)) \
            or not callable(getattr(target, "get_output_embeddings", None)):
        raise TypeError("`target_model` must be a transformers causal LM (config, get_input_embeddings, "
                        "get_output_embeddings).")
    text = tc.get_text_config() if hasattr(tc, "get_text_config") else tc
    L = getattr(text, "num_hidden_layers", None)
    if L != c.num_target_layers:
        raise ValueError(f"the draft was built for a target with num_target_layers={c.num_target_layers} layers, "
                         f"but the target has {L}.")
    hidden = getattr(text, "hidden_size", None)
    if hidden != c.hidden_size:
        raise ValueError(f"the draft's hidden_size {c.hidden_size} differs from the target's {hidden}.")
    emb, head = target.get_input_embeddings(), target.get_output_embeddings()
    if head is None:
        raise ValueError("the target has no output embeddings (lm_head); DFlash drafts decode through it.")
    vocab_in, vocab_out = _rows(emb), _rows(head)
    if c.vocab_size is not None and (vocab_in != c.vocab_size or vocab_out != c.vocab_size):
        raise ValueError(f"the draft's vocab_size {c.vocab_size} differs from the target's embeddings "
                         f"({vocab_in}) / lm_head ({vocab_out}).")
    if vocab_in is not None and not c.mask_token_id < vocab_in:
        raise ValueError(f"the draft's mask_token_id {c.mask_token_id} is outside the target's vocabulary "
                         f"of {vocab_in}.")
