r"""``BlockDiffusionScheduler``: the commit rules of confidence-remasking decoders, one step at a time.

A block-diffusion decoder (LLaDA ``generate``, Dream ``diffusion_generate``, Fast-dLLM, SDAR,
LLaDA2) fills a block of mask tokens over several model calls. Every step takes the model's
logits for the block and decides three things, all with :mod:`ddiff.ops`:

1. a token and a confidence for each position to predict (:func:`ddiff.predict_tokens`);
2. which masked positions take their token now (:func:`ddiff.select_transfer`, with a
   per-step count from the schedule below);
3. with ``editing_threshold``, which already decoded positions are re-written
   (:func:`ddiff.select_edits`, LLaDA2.1).

The pipeline (:class:`~ddiff.pipelines.BlockDiffusionPipeline`) keeps the model calls, the
layout and the callbacks; this class owns the rules, so each is written and tested once.

Schedules (how many masks a step commits; ``n`` steps for a block of ``L`` columns)
------------------------------------------------------------------------------------
* ``"llada"`` (LLaDA ``get_num_transfer_tokens``, SDAR, LLaDA2): the block's ``L`` columns are
  split evenly over the steps (``L // n`` each, the first ``L % n`` steps one more) and each
  step commits ``min(k_i, masks left)``. When the prompt ends inside the first block
  (block-causal SDAR / LLaDA2) the schedule still covers the whole aligned block and is capped
  at the masks left: a 6-token prompt, block 8 and 4 steps commit both masks in the first step.
* ``"dream"`` (Dream ``_sample``): on the grid ``t = linspace(1, eps, n + 1)`` (fp32), step
  ``i`` commits ``int(m · (1 − t_{i+1} / t_i))`` of the ``m`` masks still in the block and the
  last step commits all that are left: 8 masks in 4 steps give ``[1, 2, 2, 3]``; 16 masks in
  16 steps commit nothing in the first step. Computed per row from its current masks (Dream
  uses the batch average, which only differs when rows hold different numbers of masks).

Rules (``remasking`` and the keyword arguments)
-----------------------------------------------
* ``"low_confidence"`` / ``"margin"`` / ``"entropy"`` / ``"random"``: the top-``k`` masked
  positions by confidence (probability of the token, top-1 − top-2, negative entropy, or a
  uniform); with ``threshold`` too, every position above it if at least ``k`` pass (SDAR
  ``low_confidence_dynamic``, LLaDA2); ``threshold`` alone or ``factor`` alone are Fast-dLLM's
  rules (no schedule). ``selection_temperature`` τ > 0 samples the ``k`` positions without
  replacement with probabilities ``softmax(confidence / τ)`` (Dream ``alg_temp``).
* ``"sequential"`` (SDAR): the ``k`` columns starting at the first mask, left to right (as
  upstream, a decoded column inside that range is re-written with its new prediction).
* ``"origin"`` (Dream ``alg="origin"``): each mask is revealed with probability
  ``1 − t_{i+1} / t_i`` on Dream's grid (1 at the last step), to a token drawn from the filtered sampling
  distribution. With the mask id in ``suppress_tokens`` this is exactly the MDLM posterior
  :func:`ddiff.mdlm_step` with ``α = 1 − t``; without it, as in Dream, a drawn mask id leaves
  the position masked.

The mask id is predicted like any other token unless the caller suppresses it: every upstream
loop samples from the full vocabulary, and a position whose committed prediction is the mask
id stays masked (it counts as a mask at the next step).

Example::

    >>> sched = BlockDiffusionScheduler(schedule="dream", remasking="entropy", mask_token_id=MASK)
    >>> sched.set_timesteps(4, block_length=8)
    >>> step = 0
    >>> while not sched.is_done(step, x == MASK):
    ...     out = sched.step(model(x).logits, x, x == MASK, step, temperature=0.0)
    ...     x, step = out.x, step + 1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ddiff import ops
from ddiff.pipelines.scheduler_config import SchedulerConfigMixin
from ddiff.pipelines.utils import is_int, is_real

Tensor = torch.Tensor

__all__ = ["BlockDiffusionScheduler", "BlockDiffusionSchedulerOutput", "REMASKING", "SCHEDULES"]

SCHEDULES = ("llada", "dream")
# remasking -> the confidence kind predict_tokens measures (None: the rule needs no confidence)
REMASKING = {"low_confidence": "prob", "random": "random", "margin": "margin", "entropy": "neg_entropy",
             "sequential": None, "origin": None}
CONFIDENCE_FROM = ("raw", "sampling")


@dataclass
class BlockDiffusionSchedulerOutput:
    """What one :meth:`BlockDiffusionScheduler.step` did, all shaped ``[B, L]`` like the block.

    Attributes:
        x: int64, the block's tokens after the step.
        transfer_index: bool, masked positions committed this step (a committed mask id stays
            a mask).
        edit_index: bool, decoded positions re-written this step (editing only).
        tokens: int64, the prediction at each predicted position (-1 elsewhere, and for rows
            whose logits held NaN / +inf).
        confidence: fp32, the confidence of ``tokens`` (``-inf`` where nothing was predicted;
            for ``"origin"``, the uniform of the reveal coin).
        invalid_index: bool, predicted positions whose logits row was invalid (NaN / +inf, or
            entirely -inf after the filters and ``suppress_tokens``: the op returned -1). They
            are never committed nor edited, so ``x`` holds only the ids it held or valid
            predictions; the caller decides how to report them (the pipeline raises).
    """

    x: torch.LongTensor
    transfer_index: torch.BoolTensor
    edit_index: torch.BoolTensor
    tokens: torch.LongTensor
    confidence: torch.Tensor
    invalid_index: Optional[torch.BoolTensor] = None


class BlockDiffusionScheduler(SchedulerConfigMixin):
    r"""Per-step commit rules of block diffusion decoding (see the module docstring).

    Args:
        schedule: ``"llada"`` (even split of the block) or ``"dream"`` (Dream's ``1 − s/t``).
        remasking: ``"low_confidence"``, ``"margin"``, ``"entropy"``, ``"random"``,
            ``"sequential"`` or ``"origin"``.
        confidence_from: ``"raw"`` (softmax of the logits: LLaDA, Fast-dLLM) or ``"sampling"``
            (the tempered, filtered distribution: Dream, SDAR, LLaDA2).
        threshold: commit every mask whose confidence exceeds it (strictly; compared in fp32).
            Alone: Fast-dLLM (at least one per step); with a step count: SDAR dynamic / LLaDA2
            (all above it if at least the scheduled count passes, else the top of the count).
        factor: Fast-dLLM's dynamic rule (alone).
        editing_threshold: LLaDA2.1 editing: a decoded, generated position whose new prediction
            differs with confidence above it is re-written, at every step.
        max_post_steps: with editing, at most this many extra steps once a block has no masks;
            a post step that edits nothing ends the block.
        selection_temperature: τ of Dream's ``alg_temp``: 0 takes the top-``k``, τ > 0 samples
            ``k`` positions without replacement from ``softmax(confidence / τ)``.
        eps: the last time of Dream's grid ``linspace(1, eps, n + 1)``.
        mask_token_id: the mask id (the pipeline sets it).
    """

    def __init__(self, schedule: str = "llada", remasking: str = "low_confidence", confidence_from: str = "raw",
                 threshold: Optional[float] = None, factor: Optional[float] = None,
                 editing_threshold: Optional[float] = None, max_post_steps: int = 0,
                 selection_temperature: float = 0.0, eps: float = 1e-3, mask_token_id: Optional[int] = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}.")
        if remasking not in REMASKING:
            raise ValueError(f"`remasking` must be one of {tuple(REMASKING)}, got {remasking!r}.")
        if confidence_from not in CONFIDENCE_FROM:
            raise ValueError(f"`confidence_from` must be one of {CONFIDENCE_FROM}, got {confidence_from!r}.")
        if threshold is not None and (not is_real(threshold) or not 0.0 <= threshold <= 1.0):
            raise ValueError(f"`threshold` must be a number in [0, 1], got {threshold!r}.")
        if factor is not None:
            if not is_real(factor) or not factor > 0:
                raise ValueError(f"`factor` must be a number > 0, got {factor!r}.")
            if threshold is not None:
                raise ValueError("`factor` (Fast-dLLM's dynamic rule) cannot be combined with `threshold`.")
        if editing_threshold is not None and not is_real(editing_threshold):
            raise ValueError(f"`editing_threshold` must be a number, got {editing_threshold!r}.")
        if not is_int(max_post_steps) or max_post_steps < 0:
            raise ValueError(f"`max_post_steps` must be an int >= 0, got {max_post_steps!r}.")
        if max_post_steps > 0 and editing_threshold is None:
            raise ValueError("`max_post_steps` only applies with `editing_threshold` (post-decoding edits).")
        if not is_real(selection_temperature) or not selection_temperature >= 0:
            raise ValueError(f"`selection_temperature` must be a number >= 0, got {selection_temperature!r}.")
        if not is_real(eps) or not 0.0 < eps < 1.0:
            raise ValueError(f"`eps` must be a number in (0, 1), got {eps!r}.")
        if mask_token_id is not None and (not is_int(mask_token_id) or mask_token_id < 0):
            raise ValueError(f"`mask_token_id` must be an int >= 0, got {mask_token_id!r}.")
        rule_needs_count = remasking in ("sequential", "origin") or selection_temperature > 0
        if rule_needs_count and (threshold is not None or factor is not None):
            what = f"remasking={remasking!r}" if remasking in ("sequential", "origin") else "`selection_temperature`"
            raise ValueError(f"{what} commits a scheduled count of positions; it cannot take `threshold` or "
                             "`factor`.")
        if remasking in ("sequential", "origin") and selection_temperature > 0:
            raise ValueError(f"`selection_temperature` samples positions by confidence; remasking={remasking!r} "
                             "uses none.")
        if remasking == "origin" and editing_threshold is not None:
            raise ValueError("remasking='origin' reveals by a coin and predicts nothing to edit with.")
        self.config = dict(schedule=schedule, remasking=remasking, confidence_from=confidence_from,
                           threshold=threshold, factor=factor, editing_threshold=editing_threshold,
                           max_post_steps=max_post_steps, selection_temperature=selection_temperature, eps=eps,
                           mask_token_id=mask_token_id)
        self.num_inference_steps: Optional[int] = None
        self.block_length: Optional[int] = None
        self.timesteps: Optional[Tensor] = None
        self._counts: Optional[list[int]] = None
        self._ratios: Optional[list[float]] = None
        self._partial = False
        self._post_steps = 0
        self._last_was_post = False
        self._masked_steps = 0
        self._count_index: Optional[int] = None

    # -----------------------------------------------------------------------------------------
    # config
    # -----------------------------------------------------------------------------------------
    def __getattr__(self, name):
        config = self.__dict__.get("config")
        if config is not None and name in config:
            return config[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def replace(self, **overrides) -> "BlockDiffusionScheduler":
        """A new scheduler with some config fields replaced (this one is left as it is)."""
        unknown = sorted(set(overrides) - set(self.config))
        if unknown:
            raise TypeError(f"unknown scheduler fields {unknown}; the fields are {sorted(self.config)}.")
        return type(self)(**{**self.config, **overrides})

    @property
    def _fixed_length(self) -> bool:
        # a count rule alone runs exactly num_inference_steps steps, as LLaDA's and Dream's loops do
        return self.threshold is None and self.factor is None and self.editing_threshold is None

    # -----------------------------------------------------------------------------------------
    # timesteps
    # -----------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: Optional[int], block_length: int, device=None, *,
                      num_masked: Optional[int] = None) -> None:
        """Prepare a block: ``num_inference_steps`` steps (None for ``threshold`` / ``factor``
        alone) over a block of ``block_length`` columns, ``num_masked`` (default all) of them masks.

        Sets ``timesteps`` (``n + 1`` fp32 times from 1 to 0 for ``"llada"``, to ``eps`` for
        ``"dream"``; None without steps) and resets the block's post-step count. Nothing here
        reads device memory.
        """
        if not is_int(block_length) or block_length < 1:
            raise ValueError(f"`block_length` must be an int >= 1, got {block_length!r}.")
        if num_masked is not None and (not is_int(num_masked) or not 0 <= num_masked <= block_length):
            raise ValueError(f"`num_masked` must be an int in [0, block_length], got {num_masked!r}.")
        if num_inference_steps is None:
            if self.threshold is None and self.factor is None:
                raise ValueError("no commit rule: give a step count (a schedule), a `threshold` or a `factor`.")
            if self.remasking in ("sequential", "origin") or self.selection_temperature > 0:
                raise ValueError(f"remasking={self.remasking!r} / `selection_temperature` needs a step count.")
        else:
            if not is_int(num_inference_steps) or num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
            if self.factor is not None:
                raise ValueError("`factor` (Fast-dLLM's dynamic rule) takes no step count.")
        self.num_inference_steps = num_inference_steps
        self.block_length = block_length
        self._partial = num_masked is not None and num_masked < block_length
        self._post_steps = 0
        self._last_was_post = False
        self._masked_steps = 0
        self._count_index = None
        self._counts = self._ratios = self.timesteps = None
        if num_inference_steps is None:
            return
        n = num_inference_steps
        end = self.eps if self.schedule == "dream" else 0.0
        self.timesteps = torch.linspace(1.0, end, n + 1, dtype=torch.float32)  # fp32 as Dream's grid
        if self.schedule == "llada":
            full = torch.ones(1, block_length, dtype=torch.bool)
            self._counts = ops.num_transfer_tokens(full, n)[0].tolist()
        # 1 - s/t in fp32 on Dream's grid, as Dream computes it: its count and "origin"'s reveal
        # probability (origin is Dream's rule, so it keeps Dream's grid under either schedule)
        grid = torch.linspace(1.0, self.eps, n + 1, dtype=torch.float32)
        self._ratios = (1.0 - grid[1:] / grid[:-1]).tolist()
        if device is not None:
            self.timesteps = self.timesteps.to(device)

    def num_transfer(self, masked: Tensor, step_index: int) -> Union[int, Tensor]:
        """The number of masks step ``step_index`` commits: an int (``"llada"``; capped at the
        masks left by :func:`ddiff.select_transfer`) or a ``[B]`` int64 tensor (``"dream"``)."""
        if self.num_inference_steps is None:
            raise ValueError("this rule has no schedule (threshold / factor alone).")
        last = self.num_inference_steps - 1
        i = min(step_index, last)
        if self.schedule == "llada":
            return self._counts[i]
        left = masked.sum(dim=1)
        if i == last:
            return left
        return (left.to(torch.float32) * self._ratios[i]).to(torch.int64)

    def reveal_probability(self, step_index: int) -> float:
        """Dream ``alg="origin"``: ``1 − t_{i+1} / t_i`` on ``linspace(1, eps, n + 1)`` (1 at the last step)."""
        last = self.num_inference_steps - 1
        return 1.0 if step_index >= last else self._ratios[step_index]

    # -----------------------------------------------------------------------------------------
    # stepping
    # -----------------------------------------------------------------------------------------
    def is_done(self, step_index: int, masked: Tensor, last: Optional[BlockDiffusionSchedulerOutput] = None, *,
                x_changed: bool = False) -> bool:
        """Whether the block is finished before step ``step_index`` (its first step is 0).

        ``masked``: bool ``[B, L]``, the masks that may still be committed; ``last``: the previous
        step's output (editing looks at its edits); ``x_changed``: the caller replaced the
        tokens (a callback), so a fixed schedule may run out of masks early.

        A count rule alone runs ``num_inference_steps`` steps without reading ``masked`` (no
        host sync), except in a partly masked block. Every other rule stops once no mask is left
        (one sync per step), after ``num_inference_steps`` steps with a threshold (SDAR,
        LLaDA2), and after ``block_length`` steps for ``threshold`` / ``factor`` alone (a
        predicted mask id could otherwise repeat forever). With editing, up to
        ``max_post_steps`` steps follow the last mask, one that edits nothing ends the block,
        and at most ``num_inference_steps + block_length`` masked steps run (upstream has no
        bound).
        Editing steps run while masks are left count as masked steps: an edit may write the
        mask id and re-open the block, whose next masked step then takes the next count of the
        schedule (LLaDA2.1's ``step_idx`` counts masked steps only).
        """
        if self.block_length is None:
            raise ValueError("call set_timesteps() first.")
        steps = self.num_inference_steps
        if self._fixed_length:
            if step_index >= steps:
                return True
            return (self._partial or x_changed) and not bool(masked.any())
        if bool(masked.any()):
            self._last_was_post = False
            if self.editing_threshold is not None:  # an edit may re-open the block (upstream: no bound)
                cap = (steps or 0) + self.block_length
            else:
                cap = steps if steps is not None else self.block_length
            if self._masked_steps >= cap:
                return True
            self._count_index = self._masked_steps
            self._masked_steps += 1
            return False
        if self.editing_threshold is None:
            return True
        if self._last_was_post and last is not None and not bool(last.edit_index.any()):
            return True
        if self._post_steps >= self.max_post_steps:
            return True
        self._post_steps += 1
        self._last_was_post = True
        return False

    def step(self, logits: Tensor, x_block: Tensor, masked: Tensor, step_index: int, *,
             generated: Optional[Tensor] = None, temperature=0.0, top_k=None, top_p=None, min_p=None,
             top_p_mode: str = "inclusive", suppress_tokens=None, confidence_suppress_tokens=None, seed=None,
             offset: int = 0, generator: Optional[torch.Generator] = None,
             backend: str = "auto") -> BlockDiffusionSchedulerOutput:
        """One step on a block: predict, commit, edit.

        Args:
            logits: ``[B, L, V]`` the model's logits for the block's columns.
            x_block: int64 ``[B, L]`` the block's current tokens.
            masked: bool ``[B, L]`` the masks that may be committed (the caller leaves out rows
                that stopped).
            step_index: the step within the block (0 first).
            generated: bool ``[B, L]`` the positions the step may touch at all (editing edits
                the decoded ones among them); default every position.
            temperature, top_k, top_p, min_p, top_p_mode, suppress_tokens,
            confidence_suppress_tokens, seed, offset, generator, backend: passed to
                :func:`ddiff.predict_tokens` (``seed`` / ``offset`` / ``generator`` also drive the
                ``selection_temperature`` draw).

        Returns:
            :class:`BlockDiffusionSchedulerOutput`.
        """
        if self.block_length is None:
            raise ValueError("call set_timesteps() first.")
        if self.mask_token_id is None:
            raise ValueError("the scheduler has no `mask_token_id`.")
        editable = None
        if self.editing_threshold is not None:
            base = generated if generated is not None else torch.ones_like(masked)
            editable = base & (x_block != self.mask_token_id)
        predict = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       confidence_from=self.confidence_from, suppress_tokens=suppress_tokens, seed=seed,
                       offset=offset, generator=generator, backend=backend)
        if top_p_mode != "inclusive":
            predict["top_p_mode"] = top_p_mode
        if confidence_suppress_tokens is not None:
            predict["confidence_suppress_tokens"] = confidence_suppress_tokens

        if self._count_index is not None:  # set by is_done: the index among the block's masked steps
            step_index = self._count_index
        if self.remasking == "sequential":
            commit = self._sequential(masked, self.num_transfer(masked, step_index))
            predicted = commit
            tokens, conf = ops.predict_tokens(logits, commit, confidence="prob", **predict)
        elif self.remasking == "origin":
            predicted = masked
            tokens, coin = ops.predict_tokens(logits, masked, confidence="random", **predict)
            conf = coin
            probability = self.reveal_probability(step_index)
            if probability >= 1.0:
                commit = masked.clone()
            else:  # u < p, written as -u > -p (exact in fp32); no floor of one
                commit = ops.select_transfer(-coin, masked, threshold=-probability, min_transfer=0, backend=backend)
        else:
            mask = predicted = masked if editable is None else masked | editable
            tokens, conf = ops.predict_tokens(logits, mask, confidence=REMASKING[self.remasking], **predict)
            commit = ops.select_transfer(conf, masked, backend=backend, **self._selection(masked, step_index, seed,
                                                                                        offset, generator))
        # an invalid row (the op's -1) is never written: the sequence only ever holds valid ids
        invalid = (tokens < 0) & predicted
        commit = commit & ~invalid
        if editable is not None:
            edits = ops.select_edits(tokens, conf, x_block, editable, self.editing_threshold) & ~invalid
            x_new = torch.where(commit | edits, tokens, x_block)
        else:
            edits = torch.zeros_like(commit)
            x_new = torch.where(commit, tokens, x_block)
        return BlockDiffusionSchedulerOutput(x=x_new, transfer_index=commit, edit_index=edits, tokens=tokens,
                                             confidence=conf, invalid_index=invalid)

    def _selection(self, masked, step_index, seed, offset, generator) -> dict:
        """The keyword arguments of ``select_transfer`` for the confidence rules."""
        if self.factor is not None:
            return {"factor": self.factor}
        rule = {}
        if self.num_inference_steps is not None:
            rule["num_transfer"] = self.num_transfer(masked, step_index)
        if self.threshold is not None:
            rule["threshold"] = self.threshold
        if self.selection_temperature > 0:
            rule.update(temperature=self.selection_temperature, seed=seed, offset=offset, generator=generator)
        return rule

    @staticmethod
    def _sequential(masked: Tensor, count: Union[int, Tensor]) -> Tensor:
        """SDAR ``sequential``: the ``count`` columns from each row's first mask (rows without a
        mask select nothing). Index arithmetic only."""
        cols = torch.arange(masked.shape[1], device=masked.device)[None, :]
        first = masked.to(torch.int8).argmax(dim=1, keepdim=True)
        count = count[:, None] if isinstance(count, torch.Tensor) else count
        return masked.any(dim=1, keepdim=True) & (cols >= first) & (cols < first + count)
