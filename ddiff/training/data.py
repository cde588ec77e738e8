"""Training on your data and your model: ``--data``, ``--tokenizer``, ``--model`` for every token recipe.

Without ``--data`` the recipes train on a synthetic language (``--language``, the default the tests
use) with a tiny Llama sized by ``--hidden_size`` / ``--num_layers`` / ``--num_heads``. With it:

* ``--data FILE`` (read by :func:`read_documents`):

  - ``.txt``: **one document per line** (blank lines skipped), as ``datasets.load_dataset("text")``
    reads a text file;
  - ``.jsonl``: one JSON object per line, the document in the ``--text_column`` field
    (default ``"text"``; a record whose field is null or empty is skipped);
  - a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``
    with a ``train`` split and optionally a ``validation`` one), loaded with
    ``datasets.load_from_disk``; this needs the ``datasets`` package, which ddiff does not install.

* ``--tokenizer PATH``: a local tokenizer directory (``AutoTokenizer``, ``local_files_only``);
  default: ``--model``'s directory when it holds a tokenizer. Documents are tokenized with the
  tokenizer's own special tokens (e.g. a BOS) and end with its EOS.
* ``--max_length`` (an alias of ``--seq_len``): tokens per training row. ``--packing`` (the
  default, as the examples' ``group_texts``) concatenates the documents, each ending in EOS, and
  cuts the stream into ``max_length`` blocks (the last partial block is dropped);
  ``--no-packing`` truncates each document to ``max_length`` and right-pads it with the pad token
  (EOS when the tokenizer has none). The diffusion objectives (mdlm, udlm, hybrid, bd3lm) train on
  the padding as on any token, so a sampled sequence ends in padding once its text is done (as
  LLaDA trains on its EOS padding); ``block_refinement`` excludes padding from attention and loss,
  as the diffusers example does.
* Held-out split: ``--validation_split_percentage`` (default 5) of the documents, evenly spaced
  through the file (deterministic, independent of ``--seed``, disjoint from the training
  documents, split before packing so no document is in both); a ``DatasetDict``'s
  ``validation`` split is used as it is instead. The loop reports the loss on it every
  ``--eval_steps`` steps and at the end (``eval_loss``).
* The mask token: the absorbing objectives (mdlm, bd3lm, hybrid, block_refinement) use the
  tokenizer's mask token; a tokenizer without one gets ``--mask_token`` (default ``<|mask|>``)
  **added** as a special token (the last id; the saved tokenizer carries it). udlm needs no mask:
  it uses the tokenizer's mask token only when that is the last id (never drawn as noise) and
  refuses a tokenizer whose mask token sits elsewhere (``TokenDiffusionPipeline`` would read it
  back from the tokenizer and the uniform process cannot exclude it). Training text that
  tokenizes to the mask id is an error.
* ``--model PATH``: a local transformers directory to start from (:func:`load_model`): with
  weights (``model.safetensors``, sharded or ``.bin``) it is loaded with
  ``AutoModelForCausalLM.from_pretrained``, with only a ``config.json`` it is initialised from the
  config. Its vocabulary must cover the tokenizer (when ``--mask_token`` was just added it is
  grown by that token; any other shortfall is an error). For the token-diffusion objectives the
  model is made bidirectional (block-causal for bd3lm) the way :mod:`ddiff.denoiser` does it,
  ``config.ddiff_attention``, and a probe forward checks that the architecture honours the
  4-D attention mask (one that ignores it is refused); block_refinement trains it as the causal
  LM it is.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

Tensor = torch.Tensor

__all__ = ["TextData", "RecipeData", "add_data_arguments", "build_model", "load_model", "load_text_data",
           "load_tokenizer", "pack", "prepare_data", "read_documents", "split_documents", "tokenize_documents",
           "truncate_and_pad"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--text_column``, ``--tokenizer``, ``--model``, ``--packing``,
    ``--validation_split_percentage``, ``--mask_token`` (module docstring)."""
    group = parser.add_argument_group("your data and model (default: the synthetic --language and a tiny Llama)")
    group.add_argument("--data", default=None, metavar="PATH",
                       help="training text: a .txt file (one document per line), a .jsonl file (--text_column) "
                            "or a `datasets` save_to_disk directory")
    group.add_argument("--text_column", default="text", help="the field holding the text (.jsonl, datasets)")
    group.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="local tokenizer directory; if omitted, --model's directory when it holds a tokenizer")
    group.add_argument("--model", default=None, metavar="DIR",
                       help="local transformers directory to start from: weights, or a config.json alone "
                            "(initialised from the config); if omitted, a tiny Llama sized by --hidden_size etc.")
    group.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                       help="concatenate documents (EOS-separated) into --max_length blocks; --no-packing: "
                            "truncate / pad each document to --max_length")
    group.add_argument("--validation_split_percentage", type=float, default=5.0, metavar="P",
                       help="percent of the documents held out for the evaluation loss (0: none)")
    group.add_argument("--mask_token", default="<|mask|>",
                       help="mask token added to a tokenizer that has none (absorbing objectives)")


# ---------------------------------------------------------------------------------------------
# Reading, splitting, tokenizing
# ---------------------------------------------------------------------------------------------


def read_documents(path: str, text_column: str = "text") -> dict[str, list[str]]:
    """The documents of ``path``: ``{"train": [...]}`` plus ``"validation"`` when a ``datasets``
    ``DatasetDict`` has that split. Errors name the file, the line and what to change."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path!r} does not exist.")
    if os.path.isdir(path):
        return _read_saved_dataset(path, text_column)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            docs = [line.rstrip("\r\n") for line in f]
        docs = [d for d in docs if d.strip()]
    elif suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no} is not a JSON object: {e}.") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_no} is a JSON {type(record).__name__}, not an object.")
                if text_column not in record:
                    raise ValueError(f"{path}:{line_no} has no {text_column!r} field (it has: "
                                     f"{', '.join(map(repr, record)) or 'nothing'}); pass --text_column.")
                text = record[text_column]
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{line_no}: field {text_column!r} holds a {type(text).__name__}, "
                                     f"not text.")
                if text.strip():
                    docs.append(text)
    else:
        raise ValueError(f"--data {path!r}: expected a .txt or .jsonl file or a `datasets` save_to_disk "
                         f"directory, got a {suffix or 'suffix-less'} file.")
    if not docs:
        raise ValueError(f"--data {path!r} holds no documents.")
    return {"train": docs}


def _read_saved_dataset(path: str, text_column: str) -> dict[str, list[str]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"--data {path!r} is a directory: reading a `datasets` save_to_disk directory needs the "
                          f"`datasets` package (pip install datasets); or pass a .txt or .jsonl file.") from None
    loaded = datasets.load_from_disk(path)
    splits = {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    if "train" not in splits:
        raise ValueError(f"--data {path!r}: the DatasetDict has no 'train' split (it has: {', '.join(splits)}).")
    out = {}
    for name in ("train", "validation"):
        if name not in splits:
            continue
        split = splits[name]
        if text_column not in split.column_names:
            raise ValueError(f"--data {path!r}: split {name!r} has no {text_column!r} column (it has: "
                             f"{', '.join(split.column_names)}); pass --text_column.")
        out[name] = [t for t in split[text_column] if isinstance(t, str) and t.strip()]
    if not out["train"]:
        raise ValueError(f"--data {path!r} holds no documents.")
    return out


def split_documents(docs: list, percentage: float) -> tuple[list, list]:
    """``(train, held_out)``: ``round(len · percentage / 100)`` documents (at least one when
    ``percentage > 0``, and at least one left to train on), evenly spaced through ``docs``.
    Deterministic and disjoint; with fewer than two documents nothing is held out."""
    if not 0 <= percentage < 100:
        raise ValueError(f"--validation_split_percentage must lie in [0, 100), got {percentage}.")
    n = len(docs)
    if percentage == 0 or n < 2:
        return list(docs), []
    n_eval = min(n - 1, max(1, round(n * percentage / 100)))
    held = {int((k + 0.5) * n / n_eval) for k in range(n_eval)}
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)`` with a clear error."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--tokenizer {path!r} is not a local directory (nothing is downloaded).")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {e}") from e


def tokenize_documents(tokenizer, docs: list[str], *, chunk: int = 1000) -> list[list[int]]:
    """Token ids of each document (the tokenizer's special tokens included), each ending in EOS
    when the tokenizer has one; documents that tokenize to nothing are dropped."""
    eos = tokenizer.eos_token_id
    out = []
    for start in range(0, len(docs), chunk):
        for ids in tokenizer(docs[start:start + chunk], add_special_tokens=True)["input_ids"]:
            ids = list(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            if ids:
                out.append(ids)
    return out


def pack(sequences: list[list[int]], max_length: int) -> Tensor:
    """Concatenate ``sequences`` and cut the stream into ``[N, max_length]`` rows (remainder dropped)."""
    flat = [tok for seq in sequences for tok in seq]
    n = len(flat) // max_length
    return torch.tensor(flat[:n * max_length], dtype=torch.long).view(n, max_length)


def truncate_and_pad(sequences: list[list[int]], max_length: int, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """``(ids, valid)`` ``[N, max_length]``: each sequence cut to ``max_length`` and right-padded
    with ``pad_token_id``; ``valid`` is True on the real tokens."""
    ids = torch.full((len(sequences), max_length), pad_token_id, dtype=torch.long)
    valid = torch.zeros((len(sequences), max_length), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        seq = seq[:max_length]
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        valid[i, :len(seq)] = True
    return ids, valid


# ---------------------------------------------------------------------------------------------
# The data a recipe trains on
# ---------------------------------------------------------------------------------------------


@dataclass
class TextData:
    """Tokenized ``--data``: ``train`` / ``eval`` rows ``[N, max_length]`` and, without packing,
    their ``*_valid`` masks (True = a real token, False = padding); ``eval`` is None when nothing
    is held out. ``added_tokens``: tokens added to the tokenizer (the mask)."""

    tokenizer: object
    mask_token_id: Optional[int]
    train: Tensor
    train_valid: Optional[Tensor]
    eval: Optional[Tensor]
    eval_valid: Optional[Tensor]
    added_tokens: int = 0


def _mask_token(tokenizer, mask: str, mask_token: str) -> tuple[Optional[int], int]:
    """``(mask_token_id, tokens added)`` for ``mask`` = ``"required"`` or ``"last_or_none"`` (udlm)."""
    mask_id = tokenizer.mask_token_id
    if mask == "last_or_none":
        if mask_id is None or mask_id == len(tokenizer) - 1:
            return mask_id, 0
        raise ValueError(f"udlm: the tokenizer's mask token {tokenizer.mask_token!r} has id {mask_id}, not the last "
                         f"id {len(tokenizer) - 1}: the uniform process can only leave out the last id, and "
                         f"TokenDiffusionPipeline reads the mask back from the tokenizer. Use a tokenizer whose "
                         f"mask token is its last id, or one without a mask token.")
    if mask_id is not None:
        return mask_id, 0
    added = tokenizer.add_special_tokens({"mask_token": mask_token})
    return tokenizer.mask_token_id, added


def load_text_data(args, *, mask: str = "required") -> TextData:
    """Read, split and tokenize ``args.data`` with ``args.tokenizer`` (or ``args.model``'s)."""
    tok_path = args.tokenizer
    if tok_path is None and args.model is not None and any(
            os.path.exists(os.path.join(args.model, name)) for name in _TOKENIZER_FILES):
        tok_path = args.model
    if tok_path is None:
        raise ValueError("--data needs a tokenizer: pass --tokenizer DIR (or a --model directory that holds one).")
    tokenizer = load_tokenizer(tok_path)
    mask_id, added = _mask_token(tokenizer, mask, args.mask_token)
    max_length = args.seq_len
    if max_length < 2:
        raise ValueError(f"--max_length must be >= 2, got {max_length}.")
    splits = read_documents(args.data, args.text_column)
    if "validation" in splits:
        train_docs, eval_docs = splits["train"], splits["validation"]
    else:
        train_docs, eval_docs = split_documents(splits["train"], args.validation_split_percentage)
    if args.packing and tokenizer.eos_token_id is None:
        raise ValueError(f"packing separates documents with EOS, and the tokenizer at {tok_path!r} has no eos_token; "
                         f"pass --no-packing or a tokenizer with an EOS token.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not args.packing and pad_id is None:
        raise ValueError(f"--no-packing pads with the pad token (or EOS), and the tokenizer at {tok_path!r} has "
                         f"neither; pass --packing or a tokenizer with a pad / EOS token.")

    def rows(docs, what):
        seqs = tokenize_documents(tokenizer, docs)
        if mask_id is not None and any(mask_id in seq for seq in seqs):
            raise ValueError(f"the {what} text of {args.data!r} tokenizes to the mask token id {mask_id} "
                             f"({tokenizer.mask_token!r}); remove it from the text or pick another --mask_token.")
        if args.packing:
            ids, valid = pack(seqs, max_length), None
        else:
            ids, valid = truncate_and_pad(seqs, max_length, pad_id)
        return ids, valid

    train, train_valid = rows(train_docs, "training")
    if train.shape[0] == 0:
        raise ValueError(f"{args.data!r} gives no training row of --max_length {max_length} tokens (packing drops "
                         f"the last partial block): use more text or a smaller --max_length.")
    evals, eval_valid = (None, None)
    if eval_docs:
        evals, eval_valid = rows(eval_docs, "held-out")
        if evals.shape[0] == 0:
            raise ValueError(f"the held-out documents of {args.data!r} give no block of --max_length {max_length} "
                             f"tokens: raise --validation_split_percentage, lower --max_length, or pass "
                             f"--validation_split_percentage 0 to skip the evaluation loss.")
    return TextData(tokenizer=tokenizer, mask_token_id=mask_id, train=train, train_valid=train_valid, eval=evals,
                    eval_valid=eval_valid, added_tokens=added)


class _RowBatches:
    """Endless ``batch_size`` draws from ``rows``: one shuffled pass after another (the same
    permutation on every process, each process taking its own share). ``state_dict()`` /
    ``load_state_dict()`` (the generator and the rows left of the current pass) let a resumed
    run draw the same batches as an uninterrupted one."""

    def __init__(self, rows: Tensor, valid: Optional[Tensor], batch_size: int, *, seed: int, rank: int, world: int,
                 device):
        self.rows, self.valid, self.batch_size = rows, valid, batch_size
        self.rank, self.world, self.device = rank, world, device
        self.gen = torch.Generator().manual_seed(seed)
        self.queue = torch.empty(0, dtype=torch.long)

    def __call__(self):
        while self.queue.numel() < self.batch_size:
            perm = torch.randperm(self.rows.shape[0], generator=self.gen)
            share = perm[self.rank::self.world] if perm.numel() >= self.world else perm
            self.queue = torch.cat([self.queue, share])
        idx, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
        ids = self.rows[idx].to(self.device)
        if self.valid is None:
            return ids
        return ids, self.valid[idx].to(self.device)

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "queue": self.queue.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.queue = state["queue"].clone()


def _eval_batches(rows: Tensor, valid: Optional[Tensor], batch_size: int, rank: int, world: int, device) -> list:
    """This process's share of the held-out rows, in ``batch_size`` batches (in order); every
    process evaluates all of them when there are fewer rows than processes (none is left empty)."""
    idx = torch.arange(rows.shape[0])
    idx = idx[rank::world] if idx.numel() >= world else idx
    out = []
    for start in range(0, idx.numel(), batch_size):
        sel = idx[start:start + batch_size]
        ids = rows[sel].to(device)
        out.append(ids if valid is None else (ids, valid[sel].to(device)))
    return out


@dataclass
class RecipeData:
    """What a recipe trains on: the tokenizer it saves, ``vocab_size`` (the ids the process works
    on: the tokenizer's length), the mask id, ``next_batch`` (``[B, L]`` ids, or ``(ids, valid)``
    when padding must be excluded), ``eval_batches`` (None without a held-out split) and
    ``added_tokens`` (for :func:`build_model`)."""

    tokenizer: object
    vocab_size: int
    mask_token_id: Optional[int]
    next_batch: Callable
    eval_batches: Optional[list] = None
    added_tokens: int = 0


def prepare_data(args, accelerator, *, mask: str = "required", padding_mask: bool = False) -> RecipeData:
    """The recipe's data: the synthetic ``--language`` without ``--data``, else :func:`load_text_data`.

    ``mask``: ``"required"`` (absorbing objectives) or ``"last_or_none"`` (udlm). ``padding_mask``:
    batches of padded rows come as ``(ids, valid)`` (block_refinement); otherwise as ids alone.
    """
    if args.data is None:
        from ddiff.training.token_diffusion import LANGUAGES, language_tokenizer
        from ddiff.training.token_diffusion_recipes import language_batches

        if args.tokenizer is not None:
            raise ValueError("--tokenizer applies to --data; the synthetic --language has its own tokenizer.")
        tokens = LANGUAGES[args.language]
        return RecipeData(tokenizer=language_tokenizer(args.language), vocab_size=len(tokens),
                          mask_token_id=len(tokens) - 1, next_batch=language_batches(args, accelerator))
    data = load_text_data(args, mask=mask)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    train_valid = data.train_valid if padding_mask else None
    eval_valid = data.eval_valid if padding_mask else None
    next_batch = _RowBatches(data.train, train_valid, args.batch_size, seed=args.seed * 1000 + 7, rank=rank,
                             world=world, device=device)
    evals = None if data.eval is None else _eval_batches(data.eval, eval_valid, args.batch_size, rank, world, device)
    accelerator.print(f"data: {data.train.shape[0]} training rows, "
                      f"{0 if data.eval is None else data.eval.shape[0]} held-out rows of {args.seq_len} tokens "
                      f"({'packed' if args.packing else 'truncated / padded'}), vocabulary {len(data.tokenizer)}"
                      + (f", added mask token {data.tokenizer.mask_token!r}" if data.added_tokens else ""))
    return RecipeData(tokenizer=data.tokenizer, vocab_size=len(data.tokenizer), mask_token_id=data.mask_token_id,
                      next_batch=next_batch, eval_batches=evals, added_tokens=data.added_tokens)


# ---------------------------------------------------------------------------------------------
# The model to start from
# ---------------------------------------------------------------------------------------------


def _check_attention(model, attention: str, block_size: Optional[int]) -> None:
    """Refuse a model whose forward ignores ddiff's 4-D mask: with it, position 0 must see a later
    token of its block (bidirectional / block_causal) and not one of the next block (block_causal)."""
    from ddiff.denoiser import block_causal_mask, denoiser_logits

    bs = block_size if attention == "block_causal" else None
    length = 2 * bs if bs else 4
    vocab = model.get_input_embeddings().num_embeddings
    base = torch.arange(length, dtype=torch.long)[None] % vocab
    mask = block_causal_mask(0, length, length, bs) if bs else None
    device = next(model.parameters()).device
    name = getattr(model.config, "model_type", type(model).__name__)

    def first(changed=None):
        """Logits at position 0, with the token at ``changed`` replaced."""
        ids = base.clone()
        if changed is not None:
            ids[0, changed] = (ids[0, changed] + 1) % vocab
        return denoiser_logits(model, ids.to(device), attention_mask=None if mask is None else mask.to(device))[0, 0]

    same_block = (bs or length) - 1
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = first()
            sees_block = same_block > 0 and not torch.allclose(first(same_block), ref)
            leaks = bs is not None and not torch.allclose(first(bs), ref)
    except Exception as e:  # noqa: BLE001 -- any failure means the architecture does not take the mask
        raise ValueError(f"--model ({name}) cannot run as a {attention} denoiser: its forward does not take ddiff's "
                         f"4-D attention mask ({type(e).__name__}: {e}). Use a transformers decoder that accepts a "
                         f"4-D boolean attention_mask (Llama, Qwen2/3, Mistral, GPT-2, ...).") from e
    finally:
        model.train(was_training)
    if (same_block > 0 and not sees_block) or leaks:
        raise ValueError(f"--model ({name}) ignores ddiff's 4-D attention mask (it stays causal), so it cannot be "
                         f"made a {attention} denoiser; use a transformers decoder that honours a 4-D boolean "
                         f"attention_mask (Llama, Qwen2/3, Mistral, GPT-2, ...).")


def load_model(path: str, *, vocab_size: int, added_tokens: int = 0, attention: str = "bidirectional",
               block_size: Optional[int] = None, attn_implementation: Optional[str] = None):
    """A transformers causal LM from the local directory ``path`` (weights, or a config alone).

    ``vocab_size``: the tokenizer's length, which the model's embeddings must cover (grown by
    ``added_tokens`` when just that many are missing). ``attention``: ``"bidirectional"`` or
    ``"block_causal"`` (with ``block_size``) declare ``config.ddiff_attention`` and are checked by
    a probe forward; ``"causal"`` leaves the model an ordinary causal LM. ``attn_implementation``
    is set after the probe (e.g. ``"flex_attention"`` for bd3lm on CUDA).
    """
    import transformers

    from ddiff.pipelines.loading import load_transformers_model, read_json, resolve_checkpoint_dir

    path = resolve_checkpoint_dir(path, "--model")
    read_json(os.path.join(path, "config.json"), what="--model")
    has_weights = any(os.path.exists(os.path.join(path, name)) for name in _WEIGHT_FILES)
    try:
        if has_weights:  # config and weights checked against each other before loading
            model = load_transformers_model(path, dtype=torch.float32, what="--model").train()
        else:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise ValueError(f"--model {path!r} cannot be built as a causal LM (AutoModelForCausalLM): {e}") from e
    have = model.get_input_embeddings().num_embeddings
    if have < vocab_size:
        if have + added_tokens >= vocab_size:
            model.resize_token_embeddings(vocab_size)
        else:
            raise ValueError(f"--model {path!r} has {have} token embeddings but the tokenizer has {vocab_size} "
                             f"tokens: use the model's own tokenizer (or a model whose vocab_size covers it).")
    if attention == "causal":
        for key in ("ddiff_attention", "ddiff_block_size"):
            if hasattr(model.config, key):
                setattr(model.config, key, None)
    else:
        model.config.ddiff_attention = attention
        model.config.ddiff_block_size = block_size if attention == "block_causal" else None
        _check_attention(model, attention, block_size)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


def build_model(args, data: RecipeData, default: Callable[[], torch.nn.Module], *, attention: str = "bidirectional",
                block_size: Optional[int] = None, attn_implementation: Optional[str] = None):
    """``default()`` (the tiny model sized by the recipe's options) without ``--model``, else
    :func:`load_model` for ``data``'s tokenizer."""
    if args.model is None:
        return default()
    return load_model(args.model, vocab_size=data.vocab_size, added_tokens=data.added_tokens, attention=attention,
                      block_size=block_size, attn_implementation=attn_implementation)
