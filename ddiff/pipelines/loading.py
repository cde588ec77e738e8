"""Loading and saving checkpoints with one behaviour everywhere, failing with messages that name
what is wrong.

Every ddiff loader (``TokenDiffusionPipeline.from_pretrained``,
``BlockDiffusionPipeline.from_pretrained``, ``DFlashDraftModel.from_pretrained``,
``DFlashPipeline.from_pretrained``, the ``dflash`` training recipe) goes through these helpers:

* :func:`resolve_checkpoint_dir`: ddiff loads **local** directories only. A path that does not
  exist raises :class:`CheckpointNotFoundError` (a ``FileNotFoundError``) naming it; nothing is
  ever tried as a hub id.
* :func:`read_json`: a corrupt JSON file raises ``ValueError`` naming the file, line and column;
  a missing required key raises ``ValueError`` naming the key and the file.
* :func:`safetensors_header` / :func:`load_safetensors`: a truncated or corrupt safetensors file
  raises ``ValueError`` naming the file. The header is read and validated by hand (8-byte length,
  JSON, data offsets against the file size), so the check reads no tensor data.
* :func:`read_weight_map` / :func:`load_checkpoint_weights`: a sharded checkpoint loads each tensor
  from the file its ``model.safetensors.index.json`` maps it to (never whole shard files merged,
  where the last file would win); shard names must be plain file names (``ValueError`` for
  ``"../other/model.safetensors"``, absolute paths, subdirectories, ``".."``), so nothing is read
  from outside the checkpoint directory. The transformers loaders merge whole shard files, so
  :func:`check_transformers_checkpoint` refuses a shard holding a tensor the index maps to another
  file (or to none). A weights path that is a directory raises ``ValueError`` naming it.
* :func:`check_weights_match`: before a model is built for real, its layout (instantiated on the
  ``meta`` device: names and shapes, no memory) is compared with the safetensors headers, so a
  config that does not describe its weights (e.g. a ``config.json`` of only
  ``{"model_type": "llama"}``, which would build a default 7B model) is refused with a
  ``ValueError`` naming the file and the first offending keys, before any large allocation.
* :func:`resolve_dtype`: one keyword, ``dtype=``; ``torch_dtype=`` still works with a
  ``FutureWarning``.
* :func:`atomic_directory`: checkpoints are written into a temporary directory and moved into
  place (the config files last), so an interrupted save never leaves a directory that looks like
  a valid checkpoint.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import secrets
import shutil
import struct
import warnings
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "CONFIG_FILES",
    "CheckpointNotFoundError",
    "NotACheckpointDirectoryError",
    "atomic_directory",
    "check_transformers_checkpoint",
    "check_weights_match",
    "checkpoint_weight_shapes",
    "load_checkpoint_weights",
    "load_safetensors",
    "load_transformers_model",
    "read_json",
    "read_weight_map",
    "resolve_checkpoint_dir",
    "resolve_dtype",
    "safetensors_header",
    "weight_files",
]

PathLike = Union[str, os.PathLike]

#: Files whose presence makes a directory look like a loadable checkpoint: an atomic save removes
#: them first and writes them last.
CONFIG_FILES = ("config.json", "scheduler_config.json", "training_args.json")
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: Weight files of an earlier save that a new save into the same directory replaces.
_WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model.bin.index.json")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """A checkpoint path (or a file a checkpoint needs) does not exist.

    A ``FileNotFoundError``; also a ``ValueError`` so that code written against the earlier
    ``ValueError("... must be a local checkpoint directory ...")`` keeps working."""


class NotACheckpointDirectoryError(NotADirectoryError, ValueError):
    """A checkpoint path names a file, not a directory."""


def _with_context(exc: BaseException, prefix: str) -> BaseException:
    """``exc``'s type with ``prefix`` before its message (or a ``ValueError`` when the type cannot
    be rebuilt from one message)."""
    message = f"{prefix}: {exc}"
    try:
        new = type(exc)(message)
    except Exception:
        new = ValueError(message)
    if str(new) != message:
        new = ValueError(message)
    return new


# ---------------------------------------------------------------------------------------------
# paths, JSON, dtypes
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint_dir(path: PathLike, what: str = "checkpoint") -> str:
    """``path`` as a string, checked to be an existing local directory.

    Raises :class:`CheckpointNotFoundError` (``FileNotFoundError``) naming ``path`` when it does
    not exist, :class:`NotACheckpointDirectoryError` (``NotADirectoryError``) when it is a file and
    ``ValueError`` when it is not a path at all. ddiff never downloads: a hub id is just a path
    that does not exist.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"the {what} must be a local checkpoint directory (a path; nothing is downloaded), "
                         f"got {path!r}.")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"{path!r} does not exist: the {what} must be a local checkpoint directory "
            f"(ddiff loads local paths only and never downloads from a model hub).")
    if not os.path.isdir(path):
        raise NotACheckpointDirectoryError(
            f"{path!r} is a file: the {what} must be a local checkpoint directory (holding config.json and the "
            f"weights).")
    return path


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path!r} does not exist: the {what} needs this file.")
    return path


def read_json(path: PathLike, required: Sequence[str] = (), *, what: Optional[str] = None) -> dict:
    """Read a JSON object from ``path``.

    Raises :class:`CheckpointNotFoundError` naming the file when it is absent, ``ValueError``
    naming the file, line and column when it is not valid JSON (or not UTF-8, or not an object),
    and ``ValueError`` naming the key and the file when a ``required`` key is absent.
    """
    path = os.fspath(path)
    _require_file(path, what or "checkpoint")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 JSON file ({e.reason} at byte {e.start}).") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(data).__name__}.")
    missing = [key for key in required if key not in data]
    if missing:
        keys = ", ".join(f"`{key}`" for key in missing)
        raise ValueError(f"{path} is missing the required key{'s' if len(missing) > 1 else ''} {keys}.")
    return data


_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
                "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
                "double": torch.float64, "fp64": torch.float64}


def resolve_dtype(dtype=None, torch_dtype=None, *, caller: str = "from_pretrained") -> Optional[torch.dtype]:
    """The one ``dtype=`` keyword of every loader; ``torch_dtype=`` is its deprecated spelling.

    Returns a ``torch.dtype`` or ``None`` (the stored dtype). Accepts a ``torch.dtype``, its name
    (``"bfloat16"``, ``"torch.float16"``, ...) or ``"auto"`` (= ``None``). ``torch_dtype`` warns
    ``FutureWarning``; giving both with different values raises ``ValueError``.
    """
    if torch_dtype is not None:
        warnings.warn(f"{caller}: `torch_dtype` is deprecated, use `dtype`.", FutureWarning, stacklevel=3)
        if dtype is not None and _as_dtype(dtype, caller) != _as_dtype(torch_dtype, caller):
            raise ValueError(f"{caller}: got both `dtype={dtype!r}` and `torch_dtype={torch_dtype!r}`; "
                             "give only `dtype`.")
        dtype = torch_dtype if dtype is None else dtype
    return _as_dtype(dtype, caller)


def _as_dtype(value, caller: str) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        if name == "auto":
            return None
        if name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
    raise ValueError(f"{caller}: `dtype` must be a torch.dtype, a dtype name such as 'bfloat16', 'auto' or None; "
                     f"got {value!r}.")


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------

_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
                "C64": 8, "C128": 16}


def safetensors_header(path: PathLike) -> dict[str, dict]:
    """The tensors of a safetensors file, ``{name: {"dtype", "shape", "data_offsets"}}``, read from
    its header alone (no tensor data) and validated: a file that is absent raises
    :class:`CheckpointNotFoundError`; one that is truncated or corrupt (header too small or cut,
    not JSON, offsets past the end of the file, sizes that disagree with the shapes) raises
    ``ValueError`` naming the file."""
    path = os.fspath(path)
    _require_file(path, "checkpoint")
    size = os.path.getsize(path)

    def bad(reason: str) -> ValueError:
        return ValueError(f"{path} is not a valid safetensors file (truncated or corrupt): {reason}.")

    if size < 8:
        raise bad(f"{size} bytes, smaller than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise bad(f"the header claims {n} bytes but the file has {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    data = size - 8 - n
    end = 0
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise bad(f"tensor {name!r} has a malformed entry {info!r}") from e
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop):
            raise bad(f"tensor {name!r} has data offsets {info['data_offsets']!r}")
        if stop > data:
            raise bad(f"tensor {name!r} ends at byte {stop} of the data but the file holds {data} data bytes")
        numel = 1
        for dim in shape:
            if not isinstance(dim, int) or dim < 0:
                raise bad(f"tensor {name!r} has shape {shape!r}")
            numel *= dim
        itemsize = _ST_ITEMSIZE.get(dtype)
        if itemsize is not None and numel * itemsize != stop - start:
            raise bad(f"tensor {name!r} ({dtype} {shape}) spans {stop - start} bytes, not {numel * itemsize}")
        end = max(end, stop)
    if end != data:
        raise bad(f"the tensors cover {end} data bytes but the file holds {data}")
    return header


def load_safetensors(path: PathLike, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` after :func:`safetensors_header` has validated the file; any
    remaining error of the reader is re-raised as ``ValueError`` naming the file."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    safetensors_header(path)
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # SafetensorError and friends do not name the file
        raise ValueError(f"{path} could not be read as safetensors: {e}") from e


def _shard_name(index: str, shard) -> str:
    """``shard`` checked to be a plain file name inside the checkpoint directory."""
    if not isinstance(shard, str) or not shard or shard in (".", "..") or "\0" in shard \
            or os.path.basename(shard) != shard or os.path.isabs(shard):
        raise ValueError(f"{index}: shard file names must be plain file names inside the checkpoint directory "
                         f"(no directories, no '..', not absolute), got {shard!r}: it would leave the checkpoint "
                         f"directory.")
    return shard


def read_weight_map(directory: str) -> dict[str, str]:
    """``{tensor name: shard file name}`` of ``directory``'s ``model.safetensors.index.json``, checked:
    the index needs a ``weight_map`` object (``ValueError`` naming the index otherwise), and
    every shard name must be a plain file name, so that no tensor is read from outside the
    checkpoint directory (``"../other/model.safetensors"``, ``"/abs/x"``, ``"sub/x"``, ``".."`` are
    refused with a ``ValueError`` naming the index and the name)."""
    index = os.path.join(directory, SAFETENSORS_INDEX)
    weight_map = read_json(index, required=("weight_map",))["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: `weight_map` must be a non-empty object of tensor name -> shard file.")
    return {key: _shard_name(index, shard) for key, shard in weight_map.items()}


def _not_a_directory(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not a file: a checkpoint's weights must be files.")


def weight_files(directory: str, *, required: bool = True) -> list[str]:
    """The safetensors files of a checkpoint directory: ``model.safetensors``, or the shards of
    ``model.safetensors.index.json`` (names checked by :func:`read_weight_map`, each checked to
    exist). Returns ``[]`` when the directory holds only ``pytorch_model.bin`` weights (or, with
    ``required=False``, no weights at all); otherwise a missing weights file raises
    :class:`CheckpointNotFoundError` naming the directory, and a weights path that is a directory
    raises ``ValueError`` naming it."""
    single, index = os.path.join(directory, SAFETENSORS), os.path.join(directory, SAFETENSORS_INDEX)
    _not_a_directory(single)
    if os.path.isfile(single):
        return [single]
    _not_a_directory(index)
    if os.path.isfile(index):
        files = []
        for shard in sorted(set(read_weight_map(directory).values())):
            shard_path = os.path.join(directory, shard)
            _not_a_directory(shard_path)
            if not os.path.isfile(shard_path):
                raise CheckpointNotFoundError(f"{shard_path!r} does not exist: {index} maps tensors to it.")
            files.append(shard_path)
        return files
    if any(os.path.isfile(os.path.join(directory, name)) for name in _TORCH_WEIGHTS) or not required:
        return []
    raise CheckpointNotFoundError(f"{directory!r} holds neither {SAFETENSORS} nor {SAFETENSORS_INDEX}: "
                                  "no weights to load.")


def _sharded(directory: str, files: list[str]) -> bool:
    return files != [os.path.join(directory, SAFETENSORS)]


def checkpoint_weight_shapes(directory: str, *, required: bool = True,
                             exclusive_shards: bool = False) -> Optional[dict[str, tuple]]:
    """``{tensor name: shape}`` of a checkpoint directory's safetensors weights, from the headers
    only (every file validated by :func:`safetensors_header`); ``None`` when it has no safetensors
    weights (``pytorch_model.bin``), which cannot be inspected without loading them.

    Sharded: exactly the tensors of the index's ``weight_map``, each with its shape **in the file
    the index maps it to** (a file lacking a tensor mapped to it raises ``ValueError``). With
    ``exclusive_shards`` (the transformers loaders, which merge whole shard files so that the
    last file would win) a shard holding a tensor the index maps to another file, or to none, is
    refused with a ``ValueError`` naming the tensor and the files."""
    files = weight_files(directory, required=required)
    if not files:
        return None
    if not _sharded(directory, files):
        return {k: tuple(v["shape"]) for k, v in safetensors_header(files[0]).items()}
    index = os.path.join(directory, SAFETENSORS_INDEX)
    weight_map = read_weight_map(directory)
    headers = {os.path.basename(file): safetensors_header(file) for file in files}
    shapes: dict[str, tuple] = {}
    for name, header in headers.items():
        absent = [k for k, v in weight_map.items() if v == name and k not in header]
        if absent:
            raise ValueError(f"{os.path.join(directory, name)} lacks tensors that {index} maps to it: {absent[:4]}.")
        if exclusive_shards:
            stray = [k for k in header if weight_map.get(k) != name]
            if stray:
                k = stray[0]
                where = f"to {weight_map[k]!r}" if k in weight_map else "to no file"
                raise ValueError(f"{os.path.join(directory, name)} holds tensor {k!r} that {index} maps {where} "
                                 f"({len(stray)} such tensor(s)): transformers merges whole shard files, so the copy "
                                 f"that loads would depend on the file order; each tensor must sit only in the "
                                 f"shard the index names.")
    for key, name in weight_map.items():
        shapes[key] = tuple(headers[name][key]["shape"])
    return shapes


def load_checkpoint_weights(directory: str, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """The safetensors weights of a checkpoint directory as a state dict.

    ``model.safetensors``: every tensor (:func:`load_safetensors`). Sharded: each tensor of the
    index's ``weight_map`` is read **from the file the index maps it to** (never whole files
    merged, where the last file would win); tensors a shard holds under names the index maps
    elsewhere, or not at all, are not read. Shard names are checked by :func:`read_weight_map`
    (none may leave the directory) and every file by :func:`safetensors_header` first."""
    from safetensors import safe_open

    files = weight_files(directory)
    if not files:
        raise CheckpointNotFoundError(f"{directory!r} holds neither {SAFETENSORS} nor {SAFETENSORS_INDEX}.")
    if not _sharded(directory, files):
        return load_safetensors(files[0], device=device)
    checkpoint_weight_shapes(directory)  # headers valid, every mapped tensor present
    by_file: dict[str, list[str]] = {}
    for key, name in read_weight_map(directory).items():
        by_file.setdefault(name, []).append(key)
    state: dict[str, torch.Tensor] = {}
    for name, keys in sorted(by_file.items()):
        path = os.path.join(directory, name)
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                for key in keys:
                    state[key] = f.get_tensor(key)
        except Exception as e:  # SafetensorError and friends do not name the file
            raise ValueError(f"{path} could not be read as safetensors: {e}") from e
    return state


# ---------------------------------------------------------------------------------------------
# config <-> weights
# ---------------------------------------------------------------------------------------------


def _listing(items: Sequence, limit: int = 4) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def check_weights_match(model: torch.nn.Module, shapes: Mapping[str, Sequence[int]], *, source: str,
                        config_file: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming ``source`` (the weights file) unless the tensors ``shapes``
    (from the safetensors headers) fit ``model`` (typically built on the ``meta`` device).

    Refused: a tensor whose shape differs from the model's; and names missing from the file or
    left over in it when the parameter counts differ as well (equal counts under other names are
    left to transformers' own key conversions). Tied parameters count once; a base-model
    checkpoint loading into a model with a head (and vice versa) is recognised by
    ``base_model_prefix``; ``_keys_to_ignore_on_load_missing`` / ``_unexpected`` are honoured.
    """
    state = model.state_dict(keep_vars=True)
    expected = {name: tuple(t.shape) for name, t in state.items()}
    groups: dict[int, list[str]] = {}
    numel_expected = 0
    for name, t in state.items():
        if id(t) not in groups:
            numel_expected += t.numel()
        groups.setdefault(id(t), []).append(name)
    prefix = getattr(model, "base_model_prefix", "") or ""

    def to_model_key(key: str) -> Optional[str]:
        if key in expected:
            return key
        if prefix and f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}"
        if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
            return key[len(prefix) + 1:]
        return None

    ignore_missing = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or ())]
    ignore_unexpected = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    covered, unexpected, mismatched = set(), [], []
    numel_file = 0
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        target = to_model_key(key)
        if target is None:
            if key.endswith("rotary_emb.inv_freq") or any(p.search(key) for p in ignore_unexpected):
                continue
            unexpected.append(key)
        else:
            covered.add(target)
            if shape != expected[target]:
                mismatched.append(f"{key}: file {list(shape)} vs config {list(expected[target])}")
        n = 1
        for dim in shape:
            n *= int(dim)
        numel_file += n
    missing = [name for name in expected if name not in covered
               and not any(other in covered for other in groups[id(state[name])])
               and not any(p.search(name) for p in ignore_missing)]
    numbers_differ = numel_file != numel_expected
    if not mismatched and not (numbers_differ and (missing or unexpected)):
        return
    described = f" described by {config_file}" if config_file else ""
    parts = []
    if mismatched:
        parts.append(f"shape mismatches {_listing(mismatched)}")
    if numbers_differ and missing:
        parts.append(f"missing from the file {_listing(missing)}")
    if numbers_differ and unexpected:
        parts.append(f"not in the model {_listing(unexpected)}")
    raise ValueError(
        f"{source} does not match the model{described} ({type(model).__name__}: {numel_expected:,} parameters "
        f"expected, the file holds {numel_file:,}): " + "; ".join(parts)
        + ". The config and the weights belong to different models; nothing was loaded.")


def _transformers_loader(loader):
    import transformers

    if isinstance(loader, str):
        if not hasattr(transformers, loader):
            raise ValueError(f"transformers has no loader class {loader!r}.")
        return getattr(transformers, loader)
    return loader


def check_transformers_checkpoint(path: str, *, loader="AutoModelForCausalLM", trust_remote_code: bool = False,
                                  what: str = "checkpoint"):
    """Validate a transformers checkpoint directory before loading it; returns its config.

    ``config.json`` is read with :func:`read_json` (its ``model_type`` required unless it names
    remote code in ``auto_map``), the safetensors headers are validated, and the model the config
    describes is built on the ``meta`` device (no memory) and compared with the headers by
    :func:`check_weights_match`. A model class that cannot be built on ``meta`` (some remote
    code) or a quantized checkpoint skips the last comparison: transformers checks those itself.
    """
    from transformers import AutoConfig

    path = resolve_checkpoint_dir(path, what)
    config_file = os.path.join(path, "config.json")
    raw = read_json(config_file, what=what)
    if "model_type" not in raw and "auto_map" not in raw:
        raise ValueError(f"{config_file} is missing the required key `model_type` (the architecture to build).")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as e:
        raise _with_context(e, config_file) from e
    shapes = checkpoint_weight_shapes(path, exclusive_shards=True)
    if shapes is None or raw.get("quantization_config") is not None:
        return config
    loader_cls = _transformers_loader(loader)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = loader_cls.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # cannot be built abstractly: the real load checks it
        return config
    source = os.path.join(path, SAFETENSORS if os.path.isfile(os.path.join(path, SAFETENSORS))
                          else SAFETENSORS_INDEX)
    check_weights_match(model, shapes, source=source, config_file=config_file)
    return config


def load_transformers_model(path: PathLike, *, loader="AutoModelForCausalLM", dtype=None, device=None,
                            trust_remote_code: bool = False, model_kwargs: Optional[dict] = None,
                            what: str = "checkpoint"):
    """A transformers model from a local directory, in eval mode, after
    :func:`check_transformers_checkpoint`; ``dtype`` (``None``: the stored one) and ``device`` as
    in every ddiff loader. Never downloads (``local_files_only``)."""
    path = resolve_checkpoint_dir(path, what)
    check_transformers_checkpoint(path, loader=loader, trust_remote_code=trust_remote_code, what=what)
    kwargs = dict(model_kwargs or {})
    kwargs.update(local_files_only=True, trust_remote_code=trust_remote_code)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = _transformers_loader(loader).from_pretrained(path, **kwargs).eval()
    if device is not None:
        model = model.to(device)
    return model


# ---------------------------------------------------------------------------------------------
# atomic saving
# ---------------------------------------------------------------------------------------------


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_directory(directory: PathLike, *, last: Iterable[str] = CONFIG_FILES) -> Iterator[str]:
    """Write a checkpoint into ``directory`` atomically: ``with atomic_directory(d) as tmp:`` write
    into ``tmp``; on a clean exit the files move into ``d``, on an exception ``tmp`` is removed
    and ``d`` is left as it was.

    A new ``d`` is one ``rename`` of the staging directory (a hidden sibling). An existing ``d``
    (e.g. ``--output_dir``, which also holds ``checkpoint-N/``) is updated in place: first its
    config files (``last``: the files that make a directory look loadable) and the weight files
    of an earlier save are removed, then the new files move in with ``os.replace``, the config
    files last. An interruption while moving leaves no config file beside new weights, so the
    directory does not load as a valid checkpoint; nothing not written by this save is touched
    except those stale weight/config files.
    """
    directory = os.path.abspath(os.fspath(directory))
    last = tuple(last)
    exists = os.path.isdir(directory)
    if os.path.exists(directory) and not exists:
        raise NotADirectoryError(f"{directory!r} is a file; a checkpoint directory was expected.")
    if exists:
        stage_parent, base = directory, ".ddiff-save"
    else:
        stage_parent, base = os.path.dirname(directory), f".{os.path.basename(directory)}"
        os.makedirs(stage_parent, exist_ok=True)
    tmp = os.path.join(stage_parent, f"{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if not exists and not os.path.exists(directory):
            os.rename(tmp, directory)
            return
        os.makedirs(directory, exist_ok=True)
        new = sorted(os.listdir(tmp))
        # 1. the old checkpoint stops looking valid: config files first, then stale weights.
        for name in last:
            _remove(os.path.join(directory, name))
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name not in new and os.path.isfile(path) and any(fnmatch.fnmatch(name, p) for p in _WEIGHT_PATTERNS):
                os.remove(path)
        # 2. weights and the rest, the weight index after its shards, the config files last.
        order = sorted(new, key=lambda n: (n in last, n.endswith(".index.json"), n))
        for name in order:
            src, dst = os.path.join(tmp, name), os.path.join(directory, name)
            if os.path.isdir(src) and os.path.lexists(dst):
                _remove(dst)
            os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
