"""Loaders that fail clearly (issue 16, part 3): one loading helper, one behaviour, every loader.

Every loader (``TokenDiffusionPipeline``, ``BlockDiffusionPipeline``, ``DFlashDraftModel``,
``DFlashPipeline`` with a broken draft or a broken target, and the ``dflash`` training recipe's
target / draft loading) is run on a copy of a tiny checkpoint from ``tests/assets`` broken in
one way; each test asserts the exception type and that the message names the path, file, key
or line at fault. Saving is atomic: an interrupted save never leaves a checkpoint that loads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
import types
import warnings

import pytest
import torch

from ddiff.pipelines import BlockDiffusionPipeline, DFlashDraftModel, DFlashPipeline, TokenDiffusionPipeline
from ddiff.pipelines import loading
from ddiff.pipelines.loading import (CheckpointNotFoundError, atomic_directory, read_json, resolve_dtype,
                                     safetensors_header)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
DRAFT = os.path.join(ASSETS, "tiny_dflash_draft")
TARGET = os.path.join(ASSETS, "tiny_dflash_target")
TOKEN = os.path.join(ASSETS, "tiny_token_mdlm")


def _train_dflash(target, draft):
    from ddiff.training.dflash import DFLASH

    args = argparse.Namespace(target=target, model=target, draft=draft, new_draft_layers=None,
                              target_dtype="float32")
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1,
                                        is_main_process=True)
    return DFLASH.setup(args, accelerator)


# name -> (asset to copy and break, load(broken_dir, **kwargs), models of the result, family)
LOADERS = {
    "TokenDiffusionPipeline": (TOKEN, lambda d, **kw: TokenDiffusionPipeline.from_pretrained(d, backend="torch", **kw),
                               lambda out: [out.model], "transformers"),
    "BlockDiffusionPipeline": (TOKEN, lambda d, **kw: BlockDiffusionPipeline.from_pretrained(d, backend="torch", **kw),
                               lambda out: [out.model], "transformers"),
    "DFlashDraftModel": (DRAFT, lambda d, **kw: DFlashDraftModel.from_pretrained(d, **kw), lambda out: [out], "draft"),
    "DFlashPipeline-draft": (DRAFT, lambda d, **kw: DFlashPipeline.from_pretrained(d, TARGET, backend="torch", **kw),
                             lambda out: [out.draft_model, out.target_model], "draft"),
    "DFlashPipeline-target": (TARGET, lambda d, **kw: DFlashPipeline.from_pretrained(DRAFT, d, backend="torch", **kw),
                              lambda out: [out.draft_model, out.target_model], "transformers"),
    "train-dflash-target": (TARGET, lambda d, **kw: _train_dflash(d, DRAFT), None, "transformers"),
    "train-dflash-draft": (DRAFT, lambda d, **kw: _train_dflash(TARGET, d), None, "draft"),
}
API_LOADERS = [name for name, spec in LOADERS.items() if spec[2] is not None]


def _checkpoint(tmp_path, name):
    asset = LOADERS[name][0]
    directory = tmp_path / os.path.basename(asset)
    shutil.copytree(asset, directory)
    return str(directory)


def _load(name, directory, **kwargs):
    return LOADERS[name][1](directory, **kwargs)


def _edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    data = edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


# ---------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOADERS))
def test_missing_path_raises_file_not_found_naming_it(tmp_path, name):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError) as info:
        _load(name, missing)
    assert missing in str(info.value) and "local" in str(info.value)
    # a hub id is just a path that does not exist: never "Repo id must use alphanumeric chars"
    with pytest.raises(FileNotFoundError, match="org/model"):
        _load(name, "org/model")


@pytest.mark.parametrize("name", ["TokenDiffusionPipeline", "DFlashDraftModel", "DFlashPipeline-target"])
def test_a_file_is_not_a_checkpoint_directory(tmp_path, name):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a directory")
    with pytest.raises(NotADirectoryError, match=str(path)):
        _load(name, str(path))


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------

CORRUPT = '{\n  "model_type": "llama",\n  "vocab_size": ,\n  "hidden_size": 96\n}\n'


def _json_cases():
    for name in LOADERS:
        yield name, "config.json"
    yield "TokenDiffusionPipeline", "scheduler_config.json"
    yield "TokenDiffusionPipeline", "tokenizer_config.json"
    yield "BlockDiffusionPipeline", "tokenizer.json"


@pytest.mark.parametrize("name,file", list(_json_cases()))
def test_corrupt_json_names_the_file_and_line(tmp_path, name, file):
    directory = _checkpoint(tmp_path, name)
    path = os.path.join(directory, file)
    with open(path, "w") as f:
        f.write(CORRUPT)
    with pytest.raises(ValueError) as info:
        _load(name, directory)
    assert path in str(info.value) and "line 3" in str(info.value), str(info.value)


def _missing_key_cases():
    for name, spec in LOADERS.items():
        yield name, "config.json", ("hidden_size" if spec[3] == "draft" else "model_type")
    yield "TokenDiffusionPipeline", "scheduler_config.json", "vocab_size"


@pytest.mark.parametrize("name,file,key", list(_missing_key_cases()))
def test_missing_required_key_names_the_key_and_the_file(tmp_path, name, file, key):
    directory = _checkpoint(tmp_path, name)
    path = os.path.join(directory, file)
    _edit_json(path, lambda d: {k: v for k, v in d.items() if k != key})
    with pytest.raises(ValueError) as info:
        _load(name, directory)
    assert path in str(info.value) and f"`{key}`" in str(info.value), str(info.value)


def test_missing_config_file_is_file_not_found_naming_it(tmp_path):
    directory = _checkpoint(tmp_path, "TokenDiffusionPipeline")
    os.remove(os.path.join(directory, "scheduler_config.json"))
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        _load("TokenDiffusionPipeline", directory)


def test_read_json_messages():
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_json("nope.json")


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------


def _truncate(path, how):
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    cut = {"tiny": 5, "header": 8 + n // 2, "data": len(data) // 2, "last_byte": len(data) - 1}[how]
    with open(path, "wb") as f:
        f.write(data[:cut])


@pytest.mark.parametrize("how", ["tiny", "header", "data", "last_byte"])
@pytest.mark.parametrize("name", list(LOADERS))
def test_truncated_safetensors_names_the_file(tmp_path, name, how):
    directory = _checkpoint(tmp_path, name)
    path = os.path.join(directory, "model.safetensors")
    _truncate(path, how)
    with pytest.raises(ValueError) as info:
        _load(name, directory)
    assert path in str(info.value) and "safetensors" in str(info.value), str(info.value)


def test_corrupt_safetensors_header_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((12).to_bytes(8, "little") + b"not json at!")
    with pytest.raises(ValueError, match=f"{path}.*not JSON"):
        safetensors_header(path)


def test_sharded_draft_with_a_missing_shard_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "sharded"
    directory.mkdir()
    shutil.copy(os.path.join(DRAFT, "config.json"), directory)
    state = load_file(os.path.join(DRAFT, "model.safetensors"))
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:3]}, directory / "model-00001-of-00002.safetensors")
    with open(directory / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: f"model-0000{1 + (i >= 3)}-of-00002.safetensors" for i, k in enumerate(keys)}},
                  f)
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        DFlashDraftModel.from_pretrained(str(directory))


# ---------------------------------------------------------------------------------------------
# config against weights, before any large allocation
# ---------------------------------------------------------------------------------------------

BIG_DRAFT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128)


@pytest.mark.parametrize("name", list(LOADERS))
def test_config_that_does_not_match_its_weights_is_refused_before_allocating(tmp_path, name, monkeypatch):
    import transformers

    directory = _checkpoint(tmp_path, name)
    config = os.path.join(directory, "config.json")
    if LOADERS[name][3] == "draft":
        _edit_json(config, lambda d: {**{k: v for k, v in d.items() if k != "layer_types"}, **BIG_DRAFT})
        key = "fc.weight"
    else:  # transformers builds a default 7B Llama from this: 27 GB in float32
        with open(config, "w") as f:
            json.dump({"model_type": "llama"}, f)
        key = "embed_tokens.weight"

    def no_real_load(*args, **kwargs):
        raise AssertionError("the weights were loaded for real before the config was checked")

    if LOADERS[name][3] == "draft":
        monkeypatch.setattr(loading, "load_safetensors", no_real_load)
    else:
        monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_real_load))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        _load(name, directory)
    assert time.perf_counter() - start < 15  # building 7B parameters for real takes minutes (or the OOM killer)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 1024 * 1024  # KiB: under 1 GiB
    message = str(info.value)
    assert os.path.join(directory, "model.safetensors") in message and key in message, message
    assert config in message and "shape mismatches" in message


def test_extra_layers_in_the_weights_are_refused(tmp_path):
    directory = _checkpoint(tmp_path, "TokenDiffusionPipeline")
    _edit_json(os.path.join(directory, "config.json"), lambda d: dict(d, num_hidden_layers=2))
    with pytest.raises(ValueError, match=r"not in the model \[model\.layers\.2\."):
        _load("TokenDiffusionPipeline", directory)


# ---------------------------------------------------------------------------------------------
# dtype= and device=
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", API_LOADERS)
def test_dtype_and_device_keywords(tmp_path, name):
    directory = LOADERS[name][0]
    models = LOADERS[name][2]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = _load(name, directory, dtype=torch.float64, device="cpu")
    assert all(m.dtype == torch.float64 and m.device.type == "cpu" for m in models(out))
    with pytest.warns(FutureWarning, match="torch_dtype"):
        out = _load(name, directory, torch_dtype=torch.float64)
    assert all(m.dtype == torch.float64 for m in models(out))
    out = _load(name, directory, dtype="bfloat16")
    assert all(m.dtype == torch.bfloat16 for m in models(out))
    with pytest.raises(ValueError, match="torch_dtype"), pytest.warns(FutureWarning):
        _load(name, directory, dtype=torch.float32, torch_dtype=torch.float64)


def test_resolve_dtype():
    assert resolve_dtype() is None and resolve_dtype("auto") is None
    assert resolve_dtype("torch.float16") is torch.float16 and resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.warns(FutureWarning):
        assert resolve_dtype(None, torch.float64) is torch.float64
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8")


# ---------------------------------------------------------------------------------------------
# atomic saves
# ---------------------------------------------------------------------------------------------


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _no_temporaries(directory):
    return not any(".tmp-" in name for name in os.listdir(directory))


def test_interrupted_draft_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    old = DFlashDraftModel.from_pretrained(DRAFT)
    directory = tmp_path / "draft"
    old.save_pretrained(directory)
    new = DFlashDraftModel(old.config)
    real_save = safetensors.torch.save_file

    def dies_midway(state, path, metadata=None):
        real_save(state, path, metadata=metadata)
        with open(path, "r+b") as f:  # half a file, then the process is "killed"
            f.truncate(os.path.getsize(path) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(directory)
    monkeypatch.undo()
    again = DFlashDraftModel.from_pretrained(str(directory))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in _state(old).items())
    assert _no_temporaries(directory) and _no_temporaries(tmp_path)
    # an interrupted first save leaves nothing at all
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
        new.save_pretrained(tmp_path / "fresh")
    assert not os.path.exists(tmp_path / "fresh") and _no_temporaries(tmp_path)


def _fake_run():
    accelerator = types.SimpleNamespace(is_main_process=True, unwrap_model=lambda m: m)
    return accelerator, argparse.Namespace(output_dir="x", max_train_steps=3)


def _copy_saver(source=TOKEN, fail_after=None):
    """A recipe saver copying a checkpoint's files; with ``fail_after`` it is killed midway."""

    def save(model, directory):
        for i, name in enumerate(sorted(os.listdir(source))):
            if name == "training_args.json":
                continue
            if fail_after is not None and i == fail_after:
                with open(os.path.join(directory, "model.safetensors"), "wb") as f:
                    f.write(b"\0" * 10)
                raise KeyboardInterrupt
            shutil.copy(os.path.join(source, name), directory)

    return save


def test_interrupted_periodic_checkpoint_does_not_exist(tmp_path):
    from ddiff.training.loop import _save

    accelerator, args = _fake_run()
    checkpoint = tmp_path / "checkpoint-3"
    setup = types.SimpleNamespace(save=_copy_saver(fail_after=2))
    with pytest.raises(KeyboardInterrupt):
        _save(accelerator, setup, None, args, str(checkpoint))
    assert not os.path.exists(checkpoint) and os.listdir(tmp_path) == []
    _save(accelerator, types.SimpleNamespace(save=_copy_saver()), None, args, str(checkpoint))
    assert os.path.exists(checkpoint / "training_args.json")
    assert TokenDiffusionPipeline.from_pretrained(str(checkpoint), backend="torch").model is not None


def test_final_save_into_output_dir_is_atomic_beside_checkpoints(tmp_path, monkeypatch):
    from ddiff.training.loop import _save

    accelerator, args = _fake_run()
    out = tmp_path / "out"
    shutil.copytree(TOKEN, out)  # an earlier final model
    shutil.copytree(TOKEN, out / "checkpoint-1")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')

    # killed while moving the new files in: after the weights, before the configs
    real_replace, moved = os.replace, []

    def killed_after_weights(src, dst):
        if os.path.basename(dst) in loading.CONFIG_FILES:
            raise KeyboardInterrupt
        moved.append(os.path.basename(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(loading.os, "replace", killed_after_weights)
    with pytest.raises(KeyboardInterrupt):
        _save(accelerator, types.SimpleNamespace(save=_copy_saver()), None, args, str(out))
    monkeypatch.undo()
    assert "model.safetensors" in moved
    # new weights, but no config beside them: the directory does not load as a checkpoint
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        TokenDiffusionPipeline.from_pretrained(str(out), backend="torch")
    assert not os.path.exists(out / "config.json") and _no_temporaries(out)
    assert TokenDiffusionPipeline.from_pretrained(str(out / "checkpoint-1"), backend="torch") is not None

    # an uninterrupted save completes it; stale shards of an earlier save are gone
    _save(accelerator, types.SimpleNamespace(save=_copy_saver()), None, args, str(out))
    assert not os.path.exists(out / "model.safetensors.index.json")
    assert not os.path.exists(out / "model-00001-of-00002.safetensors")
    assert json.load(open(out / "training_args.json"))["max_train_steps"] == 3
    assert os.path.isdir(out / "checkpoint-1") and _no_temporaries(out)
    assert TokenDiffusionPipeline.from_pretrained(str(out), backend="torch") is not None


def test_atomic_directory_leaves_the_target_untouched_on_error(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (open(os.path.join(tmp, "config.json"), "w")).write('{"new": 1}')
            raise RuntimeError("interrupted")
    assert (target / "config.json").read_text() == "{}" and os.listdir(target) == ["config.json"]
    assert isinstance(CheckpointNotFoundError("x"), FileNotFoundError)
