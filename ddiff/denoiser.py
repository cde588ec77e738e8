"""Calling a denoiser: attention patterns, 4-D masks, KV-cache cropping, and a tiny model.

Discrete diffusion denoisers are ordinary transformer LMs whose attention is not causal:

* ``"bidirectional"``: every position sees every position (MDLM, UDLM);
* ``"block_causal"``: position ``i`` sees position ``j`` iff ``j // block_size <= i // block_size``
  (BD3LM at sampling time: a block sees itself and every earlier block).

A transformers decoder (Llama, Qwen, ...) is causal by default but takes a 4-D boolean
``attention_mask`` ``[B, 1, Q, KV]`` as-is, which is how ddiff makes it bidirectional or
block-causal. A model declares its pattern in its config::

    config.ddiff_attention = "bidirectional" | "block_causal"
    config.ddiff_block_size = 16          # block_causal only

A model without ``ddiff_attention`` is called as ``model(input_ids=x)`` and must be
bidirectional by itself (a masked LM such as BERT, or MDLM's DiT).

:func:`tiny_denoiser` builds such a model from a ``LlamaConfig`` (used by the tests and by
``python -m ddiff.train``).

Every ddiff pipeline calls its model through :func:`model_logits` (one forward, only the
arguments the model's ``forward`` declares) and keeps its KV cache with :func:`new_cache` /
:func:`crop_cache`, so the plumbing of a model call is written once.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Optional

import torch

Tensor = torch.Tensor

ATTENTION_PATTERNS = ("bidirectional", "block_causal")


def attention_pattern(model) -> tuple[Optional[str], Optional[int]]:
    """``(pattern, block_size)`` declared by ``model.config`` (``(None, None)`` when undeclared)."""
    config = getattr(model, "config", None)
    if config is None:  # a DDP / FSDP / compiled wrapper: look through it
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        config = getattr(inner, "config", None)
    pattern = getattr(config, "ddiff_attention", None)
    if pattern is None:
        return None, None
    if pattern not in ATTENTION_PATTERNS:
        raise ValueError(f"`config.ddiff_attention` must be one of {ATTENTION_PATTERNS}, got {pattern!r}.")
    block = getattr(config, "ddiff_block_size", None)
    if pattern == "block_causal" and (not isinstance(block, int) or block < 1):
        raise ValueError(f"a block_causal model needs `config.ddiff_block_size` >= 1, got {block!r}.")
    return pattern, block


def block_causal_mask(q_start: int, q_end: int, kv_end: int, block_size: int, device=None) -> Tensor:
    """Bool ``[Q, KV]``: query ``i`` in ``[q_start, q_end)`` sees key ``j`` in ``[0, kv_end)`` iff
    ``j // block_size <= i // block_size``."""
    qi = torch.arange(q_start, q_end, device=device) // block_size
    kj = torch.arange(0, kv_end, device=device) // block_size
    return kj[None, :] <= qi[:, None]


def logits_of(output) -> Tensor:
    """The logits of a model output: ``.logits``, the first element of a tuple, or the tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0]
    return logits


# Arguments a transformers model takes when its ``forward`` cannot be inspected.
_DEFAULT_FORWARD_PARAMS = frozenset({"input_ids", "attention_mask", "position_ids", "past_key_values", "use_cache"})
_forward_params_cache: "weakref.WeakKeyDictionary[object, tuple[frozenset, bool]]" = weakref.WeakKeyDictionary()


def forward_parameters(model) -> tuple[frozenset, bool]:
    """``(names, takes_kwargs)``: the parameters ``model.forward`` declares and whether it has ``**kwargs``.

    Cached per model (inspecting a signature costs more than a tiny model's step).
    """
    try:
        return _forward_params_cache[model]
    except (KeyError, TypeError):
        pass
    try:
        params = inspect.signature(model.forward).parameters
        names = frozenset(params)
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        result = (names, var_kw)
    except (TypeError, ValueError, AttributeError):
        result = (_DEFAULT_FORWARD_PARAMS, False)
    try:
        _forward_params_cache[model] = result
    except TypeError:  # not weak-referenceable
        pass
    return result


def model_logits(model, input_ids: Tensor, *, attention_mask=None, position_ids: Optional[Tensor] = None,
                 past_key_values=None, logits_to_keep: Optional[Tensor] = None) -> Tensor:
    """One forward of ``model``; returns the logits ``[B, Q or len(logits_to_keep), V]``.

    Only what ``model.forward`` accepts is passed: ``position_ids`` and ``use_cache`` when it
    declares them (or takes ``**kwargs``), ``logits_to_keep`` only when it declares it (the
    positions are otherwise selected from the full output). ``attention_mask`` is passed as
    given (a 2-D padding mask or a 4-D mask); with ``past_key_values`` the model runs with
    ``use_cache=True`` (the cache goes in as ``cache`` to a ``forward`` that declares that name
    instead, as newer transformers do) and the caller crops the cache (:func:`crop_cache`).

    Example::

        >>> logits = model_logits(model, ids, attention_mask=mask4d, logits_to_keep=torch.arange(4, 8))
    """
    names, var_kw = forward_parameters(model)

    def accepts(name):
        return name in names or var_kw

    kwargs = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None and accepts("position_ids"):
        kwargs["position_ids"] = position_ids
    if past_key_values is not None:
        # transformers >= 5.2x names it `cache` (and deprecates `past_key_values`)
        name = "cache" if "cache" in names and "past_key_values" not in names else "past_key_values"
        kwargs[name] = past_key_values
        kwargs["use_cache"] = True
    elif accepts("use_cache"):
        kwargs["use_cache"] = False
    kept = logits_to_keep is not None and "logits_to_keep" in names
    if kept:
        kwargs["logits_to_keep"] = logits_to_keep
    logits = logits_of(model(**kwargs))
    if logits_to_keep is not None and not kept:
        logits = logits[:, logits_to_keep]
    return logits


def denoiser_logits(model, input_ids: Tensor, *, attention_mask: Optional[Tensor] = None,
                    position_ids: Optional[Tensor] = None, past_key_values=None) -> Tensor:
    """Logits ``[B, Q, V]`` for ``input_ids`` ``[B, Q]``.

    ``attention_mask``: bool ``[Q, KV]`` (KV counts cached positions) or ``[B, 1, Q, KV]``. When
    None, a model that declares a pattern gets an all-True (bidirectional) mask; a model that
    declares none is called with ``input_ids`` alone. ``past_key_values`` is passed through with
    ``use_cache=True`` (the caller crops it).
    """
    pattern, _ = attention_pattern(model)
    if pattern is None:
        if attention_mask is not None or past_key_values is not None:
            raise ValueError("this model declares no `config.ddiff_attention`, so ddiff cannot pass it a 4-D "
                             "attention mask or a KV cache; set config.ddiff_attention (see ddiff.denoiser).")
        return model_logits(model, input_ids, position_ids=position_ids)
    batch, q_len = input_ids.shape
    past = 0 if past_key_values is None else past_key_values.get_seq_length()
    if attention_mask is None:
        attention_mask = torch.ones(q_len, past + q_len, dtype=torch.bool, device=input_ids.device)
    if attention_mask.dim() == 2:
        attention_mask = attention_mask[None, None].expand(batch, 1, *attention_mask.shape)
    if position_ids is None:
        position_ids = torch.arange(past, past + q_len, device=input_ids.device)[None].expand(batch, q_len)
    return model_logits(model, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values)


def crop_cache(cache, length: int) -> None:
    """Drop every cached position at or after ``length`` (works across transformers versions:
    a negative argument to ``crop`` removes that many positions in 4.x and 5.x alike)."""
    current = cache.get_seq_length()
    if current > length:
        cache.crop(length - current)


def new_cache(model):
    """An empty transformers ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except (TypeError, AttributeError):  # older transformers, or a model without a config
        return DynamicCache()


def tiny_denoiser(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                  intermediate_size: Optional[int] = None, max_positions: int = 512,
                  attention: str = "bidirectional", block_size: Optional[int] = None, **config_kwargs):
    """A small Llama (RoPE, RMSNorm, SwiGLU) used as a bidirectional or block-causal denoiser.

    It is a plain ``transformers.LlamaForCausalLM``: ``save_pretrained`` writes safetensors and
    ``LlamaForCausalLM.from_pretrained`` loads it back, ``ddiff_*`` config fields included.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if attention not in ATTENTION_PATTERNS:
        raise ValueError(f"`attention` must be one of {ATTENTION_PATTERNS}, got {attention!r}.")
    if attention == "block_causal" and (block_size is None or block_size < 1):
        raise ValueError("a block_causal denoiser needs `block_size` >= 1.")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False, **config_kwargs,
    )
    config.ddiff_attention = attention
    config.ddiff_block_size = block_size if attention == "block_causal" else None
    return LlamaForCausalLM(config)
