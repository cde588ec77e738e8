"""Hostile checkpoints and interrupted training (issue 17, items 10, 20, 21 and 25).

* 10: a sharded checkpoint loads each tensor from the file its ``model.safetensors.index.json``
  names (never whole files merged, last file winning); shard names that leave the directory are
  refused; the transformers loaders, which merge whole shard files, refuse overlapping shards.
* 20: a non-empty ``--output_dir`` is refused without ``--overwrite_output_dir``; a Ctrl-C inside
  the final save of a rerun leaves the previous run's checkpoint whole.
* 21: ``--resume_from_checkpoint`` continues an interrupted run to the same final weights as an
  uninterrupted one (synthetic language and ``--data``), and refuses what it cannot resume.
* 25: ``DFlashDraftModel.from_pretrained`` names the field or file at fault for malformed
  indexes and config fields of the wrong type.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddiff.pipelines import DFlashDraftModel, TokenDiffusionPipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
DRAFT = os.path.join(ASSETS, "tiny_dflash_draft")
TOKEN = os.path.join(ASSETS, "tiny_token_mdlm")


def _copy(tmp_path, asset, name="ckpt"):
    directory = tmp_path / name
    shutil.copytree(asset, directory)
    return directory


def _shard(directory, contents: dict, weight_map: dict):
    """Replace ``model.safetensors`` by the shard files ``contents`` and an index ``weight_map``."""
    os.remove(directory / "model.safetensors")
    for name, tensors in contents.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / name), metadata={"format": "pt"})
    with open(directory / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _overlapping_shards(directory):
    """Two shards that each hold every tensor; the index maps the first half of the names to the
    first file and the rest to the second, and each file's copies of the other half are garbage."""
    state = load_file(str(directory / "model.safetensors"))
    keys = sorted(state)
    first, second = keys[: len(keys) // 2], keys[len(keys) // 2:]
    garbage = {k: torch.full_like(v, 7.0) for k, v in state.items()}
    a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    _shard(directory, {a: {**{k: garbage[k] for k in second}, **{k: state[k] for k in first}},
                       b: {**{k: garbage[k] for k in first}, **{k: state[k] for k in second}}},
           {**{k: a for k in first}, **{k: b for k in second}})
    return state


# ---------------------------------------------------------------------------------------------
# item 10: sharded checkpoints
# ---------------------------------------------------------------------------------------------


def test_sharded_draft_loads_each_tensor_from_the_file_the_index_names(tmp_path):
    directory = _copy(tmp_path, DRAFT)
    state = _overlapping_shards(directory)
    loaded = DFlashDraftModel.from_pretrained(str(directory)).state_dict()
    wrong = [k for k, v in state.items() if not torch.equal(loaded[k], v)]
    assert wrong == []


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "..", "/tmp/model.safetensors", "sub/x.safetensors",
                                   ""])
def test_shard_names_that_leave_the_checkpoint_directory_are_refused(tmp_path, shard):
    directory = _copy(tmp_path, DRAFT)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(directory / "model.safetensors", other / "model.safetensors")
    state = load_file(str(directory / "model.safetensors"))
    keys = sorted(state)
    _shard(directory, {"model-00001-of-00002.safetensors": {k: state[k] for k in keys[1:]}},
           {**{k: "model-00001-of-00002.safetensors" for k in keys[1:]}, keys[0]: shard})
    with pytest.raises(ValueError, match="leave the checkpoint directory") as info:
        DFlashDraftModel.from_pretrained(str(directory))
    assert "model.safetensors.index.json" in str(info.value) and repr(shard) in str(info.value)


def test_transformers_loaders_refuse_overlapping_shards_and_load_clean_ones(tmp_path):
    overlapping = _copy(tmp_path, TOKEN, "overlapping")
    _overlapping_shards(overlapping)
    with pytest.raises(ValueError, match="maps to") as info:
        TokenDiffusionPipeline.from_pretrained(str(overlapping), backend="torch")
    assert "model-0000" in str(info.value)
    # a clean sharded copy loads the same weights as the single file
    clean = _copy(tmp_path, TOKEN, "clean")
    state = load_file(str(clean / "model.safetensors"))
    keys = sorted(state)
    a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    _shard(clean, {a: {k: state[k] for k in keys[::2]}, b: {k: state[k] for k in keys[1::2]}},
           {**{k: a for k in keys[::2]}, **{k: b for k in keys[1::2]}})
    model = TokenDiffusionPipeline.from_pretrained(str(clean), backend="torch").model
    reference = TokenDiffusionPipeline.from_pretrained(TOKEN, backend="torch").model
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# item 25: DFlashDraftModel.from_pretrained on malformed files
# ---------------------------------------------------------------------------------------------


def _edit_config(directory, **fields):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in fields.items():
        if key == "target_layer_ids":
            config["dflash_config"][key] = value
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("fields, error, name", [
    ({"initializer_range": "x"}, TypeError, "initializer_range"),
    ({"initializer_range": float("nan")}, ValueError, "initializer_range"),
    ({"initializer_range": -1.0}, ValueError, "initializer_range"),
    ({"attention_bias": "false"}, TypeError, "attention_bias"),
    ({"attention_bias": 0}, TypeError, "attention_bias"),
    ({"use_sliding_window": "false"}, TypeError, "use_sliding_window"),
    ({"rms_norm_eps": "1e-6"}, TypeError, "rms_norm_eps"),
    ({"layer_types": "full_attention"}, TypeError, "layer_types"),
    ({"target_layer_ids": "03"}, TypeError, "target_layer_ids"),
], ids=lambda v: str(v)[:30])
def test_draft_config_fields_are_checked_by_type_and_named(tmp_path, fields, error, name):
    directory = _copy(tmp_path, DRAFT)
    _edit_config(directory, **fields)
    with pytest.raises(error, match=name) as info:
        DFlashDraftModel.from_pretrained(str(directory))
    assert "config.json" in str(info.value)


def test_draft_config_booleans_and_defaults_still_load(tmp_path):
    directory = _copy(tmp_path, DRAFT)
    _edit_config(directory, attention_bias=False, use_sliding_window=None, initializer_range=0.02)
    assert DFlashDraftModel.from_pretrained(str(directory)).config.attention_bias is False


@pytest.mark.parametrize("case", ["no_weight_map", "weight_map_list", "weights_a_directory", "shard_a_directory"])
def test_malformed_draft_weights_name_the_file(tmp_path, case):
    directory = _copy(tmp_path, DRAFT)
    state = load_file(str(directory / "model.safetensors"))
    if case == "weights_a_directory":
        os.remove(directory / "model.safetensors")
        os.mkdir(directory / "model.safetensors")
        match = "model.safetensors' is a directory"
    elif case == "shard_a_directory":
        _shard(directory, {}, {k: "model-00001-of-00001.safetensors" for k in state})
        os.mkdir(directory / "model-00001-of-00001.safetensors")
        match = "model-00001-of-00001.safetensors' is a directory"
    else:
        _shard(directory, {"model-00001-of-00001.safetensors": state}, {})
        index = {"metadata": {}} if case == "no_weight_map" else {"weight_map": sorted(state)}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        match = "weight_map"
    with pytest.raises(ValueError, match=match):
        DFlashDraftModel.from_pretrained(str(directory))


# ---------------------------------------------------------------------------------------------
# items 20 and 21: the training loop's output directory, checkpoints and resuming
# ---------------------------------------------------------------------------------------------

TINY = ["--batch_size", "4", "--seq_len", "8", "--hidden_size", "16", "--num_layers", "1", "--num_heads", "2",
        "--warmup_steps", "1", "--log_every", "1", "--torch_threads", "1", "--seed", "3"]


def _weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def test_non_empty_output_dir_is_refused_without_overwrite(tmp_path):
    from ddiff.train import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier run's files")
    args = ["mdlm", "--output_dir", str(out), "--max_train_steps", "1", *TINY]
    with pytest.raises(ValueError, match="--output_dir .*out.* is not empty") as info:
        main(args)
    assert "--overwrite_output_dir" in str(info.value) and os.listdir(out) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        main(["mdlm", "--output_dir", str(tmp_path / "file"), "--max_train_steps", "1", *TINY])
    assert main(args + ["--overwrite_output_dir"]) == 0
    assert {"notes.txt", "model.safetensors", "training_args.json"} <= set(os.listdir(out))
    # an empty or absent directory needs no flag
    (tmp_path / "empty").mkdir()
    assert main(["mdlm", "--output_dir", str(tmp_path / "empty"), "--max_train_steps", "1", *TINY]) == 0


def test_ctrl_c_inside_the_final_save_of_a_rerun_keeps_the_previous_model(tmp_path, monkeypatch):
    """The issue's scenario: a rerun (absorbing) into a uniform run's directory, killed inside its
    final save after the new weights are written: the directory still loads as the uniform run."""
    from ddiff.train import main
    from ddiff.training import token_diffusion_recipes

    out = tmp_path / "out"
    assert main(["udlm", "--output_dir", str(out), "--max_train_steps", "1", *TINY]) == 0
    before = _weights(out)
    real_saver = token_diffusion_recipes.saver

    def killed_saver(tokenizer, scheduler):
        save = real_saver(tokenizer, scheduler)

        def dies(model, directory):
            model.save_pretrained(directory, safe_serialization=True)
            raise KeyboardInterrupt  # Ctrl-C after the new weights, before the configs

        return dies

    monkeypatch.setattr(token_diffusion_recipes, "saver", killed_saver)
    with pytest.raises(KeyboardInterrupt):
        main(["mdlm", "--output_dir", str(out), "--max_train_steps", "1", "--overwrite_output_dir", *TINY])
    monkeypatch.undo()
    pipe = TokenDiffusionPipeline.from_pretrained(str(out), backend="torch")
    assert pipe.process == "uniform"
    assert all(torch.equal(v, before[k]) for k, v in _weights(out).items())
    assert not any(".tmp-" in name for name in os.listdir(out)) and not any(
        ".tmp-" in name for name in os.listdir(tmp_path))


def _interrupt_after_checkpoint(monkeypatch, name):
    from ddiff.training import loop

    real_save = loop._save

    def save_then_die(accelerator, setup, model, args, directory, *rest):
        real_save(accelerator, setup, model, args, directory, *rest)
        if os.path.basename(directory) == name:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save", save_then_die)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("text")
    words = "the a cat dog sat ran on mat log and then red blue big".split()
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                            mask_token="[MASK]").save_pretrained(root / "tokenizer")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (6,), generator=g)) for _ in range(30)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return ["--data", str(root / "train.txt"), "--tokenizer", str(root / "tokenizer"),
            "--validation_split_percentage", "0"]


DFLASH_ARGS = ["--target", os.path.join(ASSETS, "tiny_dflash_target"), "--draft", DRAFT, "--data",
               os.path.join(DRAFT, "prompts.jsonl"), "--num_anchors", "4", "--attention_backend", "torch",
               "--batch_size", "2", "--seq_len", "32", "--warmup_steps", "1", "--log_every", "1", "--torch_threads",
               "1"]


@pytest.mark.parametrize("objective, source, extra", [
    ("mdlm", "language", ["--gradient_accumulation_steps", "2"]),
    ("udlm", "data", []),
    ("hybrid", "language", []),
    ("bd3lm", "language", ["--attention", "dense"]),
    ("block_refinement", "data", ["--no-packing"]),
    ("dflash", "jsonl", []),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, capsys, text_data,
                                                                     objective, source, extra):
    from ddiff.train import main
    from ddiff.training.loop import TRAINING_STATE

    common = DFLASH_ARGS if objective == "dflash" else TINY + (text_data if source == "data" else [])
    args = [objective, "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-2", *common,
            *extra]
    straight = tmp_path / "straight"
    assert main(args + ["--output_dir", str(straight)]) == 0
    expected = _weights(straight)

    interrupted = tmp_path / "interrupted"
    _interrupt_after_checkpoint(monkeypatch, "checkpoint-2")
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--output_dir", str(interrupted)])
    monkeypatch.undo()
    assert sorted(os.listdir(interrupted)) == ["checkpoint-2"]
    assert TRAINING_STATE in os.listdir(interrupted / "checkpoint-2")
    capsys.readouterr()
    assert main(args + ["--output_dir", str(interrupted), "--resume_from_checkpoint", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "at step 2" in printed and "step 3/4" in printed and "step 1/4" not in printed
    resumed = _weights(interrupted)
    assert not all(torch.equal(v, _weights(interrupted / "checkpoint-2")[k]) for k, v in resumed.items())
    assert all(torch.equal(v, expected[k]) for k, v in resumed.items())
    # an explicit path resumes the same way
    again = tmp_path / "again"
    assert main(args + ["--output_dir", str(again), "--resume_from_checkpoint", str(interrupted / "checkpoint-2")]) == 0
    assert all(torch.equal(v, expected[k]) for k, v in _weights(again).items())


def test_resume_refuses_what_it_cannot_resume(tmp_path):
    from ddiff.train import main

    out = tmp_path / "out"
    args = ["mdlm", "--max_train_steps", "2", "--checkpointing_steps", "1", *TINY]
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        main(args + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert main(args + ["--output_dir", str(out)]) == 0
    with pytest.raises(ValueError, match="no complete training state"):  # the final model has none
        main(args + ["--output_dir", str(tmp_path / "o2"), "--resume_from_checkpoint", str(out)])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(args + ["--output_dir", str(tmp_path / "o3"), "--resume_from_checkpoint", str(tmp_path / "nowhere")])
    bigger = [a if a != "16" else "32" for a in args]
    with pytest.raises(ValueError, match="does not match this run's model"):
        main(bigger + ["--output_dir", str(tmp_path / "o4"), "--resume_from_checkpoint", str(out / "checkpoint-1")])
    (out / "checkpoint-1" / "training_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="training_state.pt could not be read"):
        main(args + ["--output_dir", str(tmp_path / "o5"), "--resume_from_checkpoint", str(out / "checkpoint-1")])
