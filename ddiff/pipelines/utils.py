"""Helpers shared by the ddiff pipelines (block diffusion, token diffusion, draft-plus-target).

Nothing here samples or selects tokens (that is :mod:`ddiff.ops`); this module holds the
plumbing every discrete-diffusion pipeline repeats: the output dataclass, a switchable tqdm
progress bar whose configuration survives nested bars, the ``callback_on_step_end`` protocol,
prompt encoding with left padding, token-id normalisation and text decoding.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = [
    "DiscreteDiffusionPipelineOutput",
    "ProgressBarMixin",
    "check_callback_ids",
    "check_left_padded",
    "check_token_ids",
    "decode_sequences",
    "encode_prompts",
    "execution_device",
    "is_int",
    "is_real",
    "model_dtype",
    "model_output_size",
    "model_vocab_size",
    "run_callback",
    "token_id_list",
]


def is_int(value) -> bool:
    """True for Python / NumPy integers (not bools)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for Python / NumPy real numbers (not bools)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class DiscreteDiffusionPipelineOutput:
    """What a ddiff text pipeline returns.

    Attributes:
        sequences: ``[B, L]`` int64, the generated token ids only (no prompt). ``L`` is the
            requested number of new tokens unless every row stopped early at EOS; rows that
            stopped earlier than ``L`` are padded after their EOS with the pad id.
        texts: the decoded ``sequences`` (special tokens skipped), or None without a tokenizer
            or with ``output_type="ids"``.
        nfe: number of model forward calls (a classifier-free-guidance forward runs the
            conditional and unconditional rows in one call and counts once).
        steps: number of denoising steps (one token-commit decision each).
        block_times: wall-clock seconds spent on each decoded block.
        finished: ``[B]`` bool, True for rows that produced an EOS.
    """

    sequences: torch.LongTensor
    texts: Optional[list[str]] = None
    nfe: int = 0
    steps: int = 0
    block_times: list[float] = field(default_factory=list)
    finished: Optional[torch.BoolTensor] = None


class ProgressBarMixin:
    """diffusers-style ``set_progress_bar_config`` / ``progress_bar``.

    The stored configuration is never mutated by a call: per-call overrides (``disable`` for
    ``progress=False``, a ``desc`` for an inner loop) are merged into a copy, so nested or
    repeated bars keep what the user configured.
    """

    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress_bar_config = dict(kwargs)

    @property
    def progress_bar_config(self) -> dict:
        return dict(getattr(self, "_progress_bar_config", {}))

    def progress_bar(self, iterable=None, total=None, defaults: Optional[dict] = None, **overrides):
        """A tqdm bar: ``defaults`` < the stored configuration < ``overrides``."""
        from tqdm.auto import tqdm

        config = dict(defaults or {})
        config.update(self.progress_bar_config)
        config.update(overrides)
        return tqdm(iterable, total=total, **config)


def run_callback(callback: Optional[Callable], pipe, step: int, timestep: int, tensors: dict) -> dict:
    """Call ``callback(pipe, step, timestep, callback_kwargs)`` and return what it hands back.

    The callback may return a dict with replacements for some of ``tensors`` (e.g. ``{"x": x}``);
    the caller must rebind those names. ``None`` means "no change".
    """
    if callback is None:
        return {}
    out = callback(pipe, step, timestep, dict(tensors))
    if out is None:
        return {}
    if not isinstance(out, dict):
        raise TypeError(f"`callback_on_step_end` must return a dict or None, got {type(out).__name__}.")
    unknown = sorted(set(out) - set(tensors))
    if unknown:
        raise ValueError(f"`callback_on_step_end` returned unknown keys {unknown}; allowed: {sorted(tensors)}.")
    return out


def token_id_list(value, name: str) -> list[int]:
    """An int, a sequence of ints or an integer tensor as a list of ints (empty for None)."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"`{name}` must hold integer token ids, got {value.dtype}.")
        return value.reshape(-1).tolist()
    if is_int(value):
        return [value]
    if isinstance(value, (str, bytes)):
        raise TypeError(f"`{name}` must be an int or a sequence of ints, got {type(value).__name__}.")
    try:
        ids = list(value)
    except TypeError:
        raise TypeError(f"`{name}` must be an int or a sequence of ints, got {type(value).__name__}.") from None
    if not all(is_int(i) for i in ids):
        raise TypeError(f"`{name}` must hold ints.")
    return ids


def execution_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for param in model.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return torch.float32


def model_vocab_size(model) -> Optional[int]:
    """The number of token ids ``model`` embeds: its input embedding's ``num_embeddings``, else
    ``config.vocab_size`` (of the text config), else None (unknown: ids are not range-checked)."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            size = getattr(get(), "num_embeddings", None)
        except (NotImplementedError, AttributeError, TypeError):
            size = None
        if is_int(size):
            return int(size)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "vocab_size", None)
    return int(size) if is_int(size) else None


def model_output_size(model) -> Optional[int]:
    """The number of logit columns ``model`` produces: its output embedding's ``out_features``
    (``num_embeddings`` for a tied embedding), else :func:`model_vocab_size`, else None."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError, TypeError):
            head = None
        for attr in ("out_features", "num_embeddings"):
            size = getattr(head, attr, None)
            if is_int(size):
                return int(size)
    return model_vocab_size(model)


def check_token_ids(name: str, ids: torch.Tensor, vocab: Optional[int], where: Optional[torch.Tensor] = None, *,
                    what: str = "the model's vocabulary") -> None:
    """Raise ValueError naming ``name`` unless every id of ``ids`` (where ``where`` is True, if
    given) lies in ``[0, vocab)`` (``what`` names that range); the message gives the first bad id
    and its batch / position. ``vocab`` None checks only that ids are >= 0. Reads the values
    (one host sync)."""
    bad = ids < 0 if vocab is None else (ids < 0) | (ids >= vocab)
    if where is not None:
        bad &= where
    if not bool(bad.any()):
        return
    index = [int(i) for i in torch.nonzero(bad)[0]]
    if len(index) == 2:
        at = f" at batch {index[0]}, position {index[1]}"
    else:
        at = f" at position {index[0]}" if len(index) == 1 else ""
    limit = f"{what} [0, {vocab})" if vocab is not None else "the vocabulary (ids are >= 0)"
    raise ValueError(f"`{name}` holds token id {int(ids[tuple(index)])}{at}, outside {limit}.")


def check_callback_ids(ids, like: torch.Tensor, vocab: Optional[int], *, what: str = "the model's vocabulary"
                       ) -> torch.Tensor:
    """The ``x`` a ``callback_on_step_end`` returned, checked against the sequence ``like`` it
    replaces: a ``torch.Tensor`` (TypeError otherwise) of an integer dtype (not bool; TypeError),
    shaped like ``like`` (ValueError) with every id in ``[0, vocab)`` (ValueError naming batch and
    position; one host sync). Returned as int64 on ``like``'s device."""
    name = "the `x` returned by `callback_on_step_end`"
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}.")
    if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got {ids.dtype}.")
    if tuple(ids.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have the shape of `x`, {tuple(like.shape)}, got {tuple(ids.shape)}.")
    ids = ids.to(device=like.device, dtype=torch.int64)
    check_token_ids("callback_on_step_end`'s `x", ids, vocab, what=what)
    return ids


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Raise unless every row of a 0/1 ``[B, P]`` mask is zeros then ones (left padding).

    The values are checked before any cast: a bool, integer or floating mask must hold exactly
    0 and 1 (``0.5`` or NaN is a ValueError, not truncated to 0); a complex mask is a TypeError."""
    if attention_mask.is_complex():
        raise TypeError(f"`attention_mask` must be a bool, integer or float tensor of 0 / 1, got "
                        f"{attention_mask.dtype}.")
    if attention_mask.dtype != torch.bool and attention_mask.numel() \
            and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0].item()
        raise ValueError(f"`attention_mask` must hold only 0 and 1, got {bad!r}.")
    m = attention_mask.to(torch.int64)
    if m.shape[1] > 1 and bool((m[:, 1:] < m[:, :-1]).any()):
        raise ValueError(
            "`attention_mask` must be left-padded (each row zeros, then ones): right padding would put "
            "pad tokens between the prompt and the generated tokens. Use tokenizer.padding_side = 'left'."
        )
    if m.shape[1] and bool((m.sum(1) == 0).any()):
        raise ValueError("every prompt needs at least one token (a row of `attention_mask` is all zeros).")


def encode_prompts(
    tokenizer,
    prompt: Union[str, Sequence[str]],
    *,
    use_chat_template: bool = False,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise one or more prompts with left padding; returns ``(input_ids, attention_mask)``.

    With ``use_chat_template`` each prompt becomes a one-turn user message with the generation
    prompt appended, and no further special tokens are added.
    """
    if tokenizer is None:
        raise ValueError("`prompt` needs a tokenizer; pass `input_ids` instead, or give the pipeline a tokenizer.")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("`prompt` must be a string or a non-empty list of strings.")
    add_special_tokens = True
    if use_chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("`use_chat_template=True` but the tokenizer has no chat template.")
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        add_special_tokens = False
    side = getattr(tokenizer, "padding_side", None)
    try:
        tokenizer.padding_side = "left"
        padded = len(prompts) > 1
        if padded and tokenizer.pad_token_id is None:
            raise ValueError("batched prompts need padding, but the tokenizer has no pad token.")
        enc = tokenizer(prompts, return_tensors="pt", padding=padded, add_special_tokens=add_special_tokens)
    finally:
        if side is not None:
            tokenizer.padding_side = side
    ids = enc["input_ids"].to(device)
    mask = enc.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    return ids, mask


def decode_sequences(tokenizer, sequences: torch.Tensor, *, skip_special_tokens: bool = True) -> Optional[list[str]]:
    """Batch-decode generated ids (None without a tokenizer)."""
    if tokenizer is None:
        return None
    return tokenizer.batch_decode(sequences.tolist(), skip_special_tokens=skip_special_tokens)
