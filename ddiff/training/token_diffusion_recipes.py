"""``python -m ddiff.train mdlm | udlm``: token diffusion denoisers on a synthetic language or your text.

* ``mdlm``: absorbing diffusion with :func:`ddiff.training.mdlm_loss`; ``--block_size`` trains a
  BD3LM (block-causal denoiser, ``x_t ⊕ x_0`` under :func:`ddiff.training.block_diffusion_mask`).
* ``udlm``: uniform diffusion with :func:`ddiff.training.udlm_loss` (the mask id is the last id and
  is never used as noise).

The denoiser is :func:`ddiff.denoiser.tiny_denoiser` (a small Llama made bidirectional or
block-causal) sized by ``--hidden_size`` / ``--num_layers`` / ``--num_heads``; the data is a
synthetic language (``--language``, see :data:`ddiff.training.LANGUAGES`), drawn fresh on every
process (seeded by ``--seed`` and the process index). ``--data`` / ``--tokenizer`` / ``--model``
train on your text and start from your model instead (:mod:`ddiff.training.data`). Checkpoints
hold ``model.safetensors`` + ``config.json`` (transformers), the tokenizer and ``scheduler_config.json``
(:class:`ddiff.pipelines.TokenDiffusionScheduler`), so ``TokenDiffusionPipeline.from_pretrained(dir)``
loads them.
"""

from __future__ import annotations

import argparse

import torch

from ddiff.training.data import add_data_arguments
from ddiff.training.loop import Recipe, TrainingSetup

__all__ = ["MDLM", "UDLM", "add_denoiser_arguments", "build_denoiser", "language_batches"]


def add_denoiser_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the synthetic-language denoisers (shared by the token diffusion recipes)."""
    parser.add_argument("--language", default="sorted_digits", choices=["sorted_digits", "brackets"],
                        help="synthetic training language")
    parser.add_argument("--seq_len", "--max_length", dest="seq_len", type=int, default=16,
                        help="tokens per training row (synthetic sentences, or --data rows)")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--intermediate_size", type=int, default=None, help="default: 3 * hidden_size")
    parser.add_argument("--alpha_schedule", default="log_linear", choices=["log_linear", "linear", "cosine", "geometric"])
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--t_min", type=float, default=1e-3, help="smallest training time")
    add_data_arguments(parser)


def build_denoiser(args, vocab_size: int, *, block_size=None):
    from ddiff.denoiser import tiny_denoiser

    return tiny_denoiser(vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                         num_heads=args.num_heads, intermediate_size=args.intermediate_size,
                         max_positions=max(64, 2 * args.seq_len),
                         attention="block_causal" if block_size else "bidirectional", block_size=block_size)


class _LanguageBatches:
    """Fresh ``[batch_size, seq_len]`` sentences on a device, drawn with one generator whose state
    (``state_dict`` / ``load_state_dict``) a checkpoint saves, so a resumed run draws the same."""

    def __init__(self, language: str, batch_size: int, seq_len: int, seed: int, device):
        self.language, self.batch_size, self.seq_len, self.device = language, batch_size, seq_len, device
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self):
        from ddiff.training.token_diffusion import sample_language

        return sample_language(self.language, self.batch_size, self.seq_len, generator=self.generator).to(self.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def language_batches(args, accelerator):
    """A callable drawing fresh ``[batch_size, seq_len]`` sentences on this process's device
    (resumable: it has ``state_dict`` / ``load_state_dict``)."""
    return _LanguageBatches(args.language, args.batch_size, args.seq_len,
                            args.seed * 1000 + accelerator.process_index + 7, accelerator.device)


def saver(tokenizer, scheduler):
    def save(model, directory):
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        scheduler.save_config(directory)

    return save


def _setup(objective: str):
    def setup(args, accelerator) -> TrainingSetup:
        from ddiff.pipelines.token_diffusion_scheduler import TokenDiffusionScheduler
        from ddiff.training.data import build_model, prepare_data
        from ddiff.training.token_diffusion import mdlm_loss, udlm_loss

        data = prepare_data(args, accelerator, mask="required" if objective == "mdlm" else "last_or_none")
        vocab_size, mask_id = data.vocab_size, data.mask_token_id
        block_size = getattr(args, "block_size", None)
        model = build_model(args, data, lambda: build_denoiser(args, vocab_size, block_size=block_size),
                            attention="block_causal" if block_size else "bidirectional", block_size=block_size)
        process = "absorbing" if objective == "mdlm" else "uniform"
        scheduler = TokenDiffusionScheduler(vocab_size=vocab_size, mask_token_id=mask_id, forward_process=process,
                                            alpha_schedule=args.alpha_schedule, eps=args.eps)
        gen = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index + 1)
        kwargs = dict(alpha_schedule=args.alpha_schedule, eps=args.eps, t_min=args.t_min)
        if objective == "mdlm":
            kwargs.update(mask_token_id=mask_id, block_size=block_size)
            loss_fn = mdlm_loss
        else:
            kwargs.update(vocab_size=vocab_size, mask_token_id=mask_id)
            loss_fn = udlm_loss
        return TrainingSetup(model=model, next_batch=data.next_batch,
                             loss=lambda m, x0: loss_fn(m, x0, generator=gen, **kwargs),
                             save=saver(data.tokenizer, scheduler), eval_batches=data.eval_batches,
                             eval_loss=lambda m, x0: loss_fn(m, x0, **kwargs), generators={"noise": gen})

    return setup


def _mdlm_arguments(parser):
    add_denoiser_arguments(parser)
    parser.add_argument("--block_size", type=int, default=None, help="BD3LM block size (block-causal model)")


MDLM = Recipe("mdlm", "absorbing (masked) diffusion: MDLM, or BD3LM with --block_size", _mdlm_arguments,
              _setup("mdlm"))
UDLM = Recipe("udlm", "uniform diffusion: UDLM", add_denoiser_arguments, _setup("udlm"))
