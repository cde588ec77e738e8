"""Training on the user's data and model: ``--data`` / ``--tokenizer`` / ``--model`` (ddiff.training.data).

Every recipe trains a few steps on a small text file with a tokenizer built here and a tiny model
config, writes a checkpoint, and its pipeline loads it and generates. Plus the data path itself:
.txt / .jsonl reading, packing vs truncation, the held-out split, the evaluation loss and the
errors a wrong ``--data`` / ``--model`` gets.
"""

import argparse
import json
import math
import os
import re
import sys

import pytest
import torch

from ddiff.training.data import (load_model, load_text_data, pack, read_documents, split_documents,
                                 tokenize_documents, truncate_and_pad)

WORDS = ("the a cat dog bird sat ran flew on over under mat log tree and then quickly slowly red blue big small "
         "one two three").split()


def _corpus(n_docs=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(4, 12, (1,), generator=g))
        docs.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)))
    return docs


def _tokenizer(directory, *, mask=True):
    """A word-level tokenizer trained on WORDS: [PAD]=0, [UNK]=1, [EOS]=2, the words, [MASK] last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    extra = {"mask_token": "[MASK]"} if mask else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                   **extra)
    fast.save_pretrained(directory)
    return fast


def _llama_config(directory, vocab_size, *, weights=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    if weights:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(directory)
    else:
        config.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("userdata")
    tok = _tokenizer(root / "tokenizer")
    docs = _corpus()
    (root / "train.txt").write_text("\n".join(docs[:20]) + "\n\n" + "\n".join(docs[20:]) + "\n")
    with open(root / "train.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "body": d}) + "\n")
    return {"root": root, "tokenizer": str(root / "tokenizer"), "vocab": len(tok), "docs": docs,
            "txt": str(root / "train.txt"), "jsonl": str(root / "train.jsonl"),
            "config": _llama_config(root / "config_only", len(tok)),
            "weights": _llama_config(root / "weights", len(tok), weights=True)}


def _args(**kw):
    base = dict(data=None, text_column="text", tokenizer=None, model=None, packing=True,
                validation_split_percentage=5.0, mask_token="<|mask|>", seq_len=16)
    base.update(kw)
    return argparse.Namespace(**base)


COMMON = ["--batch_size", "2", "--max_train_steps", "3", "--warmup_steps", "1", "--log_every", "1",
          "--eval_steps", "2", "--torch_threads", "1", "--max_length", "16", "--validation_split_percentage", "10"]

RECIPES = [
    ("mdlm", "txt", "config", []),
    ("udlm", "jsonl", "config", ["--text_column", "body"]),
    ("hybrid", "txt", "weights", ["--mask_fraction", "0.3"]),
    ("bd3lm", "txt", "config", ["--block_size", "4", "--attention", "dense"]),
    ("block_refinement", "jsonl", "weights", ["--text_column", "body", "--prompt_length", "4", "--block_length", "4",
                                              "--no-packing"]),
]


@pytest.mark.parametrize("objective,data,model,extra", RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_trains_on_user_data_and_its_pipeline_generates(tmp_path, capsys, files, one_torch_thread,
                                                               objective, data, model, extra):
    from ddiff.train import main

    out = tmp_path / objective
    assert main([objective, "--output_dir", str(out), "--data", files[data], "--tokenizer", files["tokenizer"],
                 "--model", files[model], *COMMON, *extra]) == 0
    printed = capsys.readouterr().out
    assert {"model.safetensors", "config.json", "scheduler_config.json", "tokenizer.json",
            "training_args.json"} <= set(os.listdir(out))
    evals = re.findall(r"eval step (\d+)/3\s+eval_loss (\S+)", printed)
    assert [step for step, _ in evals] == ["2", "3"]  # every --eval_steps and at the end
    assert all(math.isfinite(float(value)) for _, value in evals)
    with open(out / "training_args.json") as f:
        assert json.load(f)["data"] == files[data]
    vocab = files["vocab"]
    if objective == "block_refinement":
        from ddiff.pipelines.block_diffusion import BlockDiffusionPipeline
        from ddiff.pipelines.block_diffusion_scheduler import BlockDiffusionScheduler

        scheduler = BlockDiffusionScheduler.from_config(out)
        pipe = BlockDiffusionPipeline.from_pretrained(str(out), attention="causal", scheduler=scheduler,
                                                      backend="torch")
        assert pipe.mask_token_id == vocab - 1
        prompt = torch.tensor([pipe.tokenizer("the cat sat on")["input_ids"]] * 2)
        res = pipe(input_ids=prompt, max_new_tokens=4, block_length=2, steps_per_block=2, output_type="ids",
                   progress=False, eos_early_stop=False)
        assert res.sequences.shape == (2, 4)
    else:
        from ddiff.pipelines.token_diffusion import TokenDiffusionPipeline

        pipe = TokenDiffusionPipeline.from_pretrained(out, backend="torch")
        assert pipe.process == {"mdlm": "absorbing", "bd3lm": "absorbing", "udlm": "uniform"}.get(objective, objective)
        assert pipe.model.config.ddiff_attention == ("block_causal" if objective == "bd3lm" else "bidirectional")
        res = pipe(batch_size=2, seq_len=8, num_inference_steps=4, seed=0, progress=False, output_type="ids",
                   **({"block_size": 4} if objective == "bd3lm" else {}))
        assert res.sequences.shape == (2, 8)
        if objective != "udlm":
            assert not bool((res.sequences == pipe.mask_token_id).any())
    assert bool(((res.sequences >= 0) & (res.sequences < vocab)).all())


def test_a_tokenizer_without_a_mask_token_gets_one_and_the_model_grows(tmp_path, capsys, one_torch_thread, files):
    from ddiff.train import main
    from ddiff.pipelines.token_diffusion import TokenDiffusionPipeline

    tok = _tokenizer(tmp_path / "tok", mask=False)
    model_dir = _llama_config(tmp_path / "model", len(tok), weights=True)
    out = tmp_path / "out"
    assert main(["mdlm", "--output_dir", str(out), "--data", files["txt"], "--tokenizer", str(tmp_path / "tok"),
                 "--model", model_dir, "--validation_split_percentage", "0", *COMMON[:-2]]) == 0
    printed = capsys.readouterr().out
    assert "added mask token '<|mask|>'" in printed and "eval step" not in printed  # nothing held out
    pipe = TokenDiffusionPipeline.from_pretrained(out, backend="torch")
    assert pipe.mask_token_id == len(tok) and pipe.tokenizer.mask_token == "<|mask|>"
    assert pipe.model.get_input_embeddings().num_embeddings == len(tok) + 1


def test_the_tokenizer_defaults_to_the_model_directory(tmp_path, capsys, one_torch_thread, files):
    from ddiff.train import main

    model_dir = _llama_config(tmp_path / "model", files["vocab"])
    _tokenizer(model_dir)
    out = tmp_path / "out"
    assert main(["udlm", "--output_dir", str(out), "--data", files["txt"], "--model", model_dir, *COMMON]) == 0
    assert "tokenizer.json" in os.listdir(out)


def test_reading_txt_and_jsonl(files):
    docs = files["docs"]
    assert read_documents(files["txt"]) == {"train": docs}  # one document per line, blank lines skipped
    assert read_documents(files["jsonl"], "body") == {"train": docs}


def test_reading_a_datasets_directory(tmp_path, files):
    datasets = pytest.importorskip("datasets")  # in the test extra; optional for users
    docs = files["docs"]
    datasets.Dataset.from_dict({"body": docs[:30]}).save_to_disk(str(tmp_path / "single"))
    assert read_documents(str(tmp_path / "single"), "body") == {"train": docs[:30]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:30]}),
                          "validation": datasets.Dataset.from_dict({"text": docs[30:]})}).save_to_disk(
        str(tmp_path / "splits"))
    assert read_documents(str(tmp_path / "splits")) == {"train": docs[:30], "validation": docs[30:]}
    with pytest.raises(ValueError, match="no 'body' column"):
        read_documents(str(tmp_path / "splits"), "body")


def test_packing_and_truncation_blocks(files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files["tokenizer"], local_files_only=True)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    seqs = tokenize_documents(tok, ["the cat sat", "a dog ran over the big red log then quickly flew"])
    assert seqs[0] == tok("the cat sat")["input_ids"] + [eos] and all(s[-1] == eos for s in seqs)
    packed = pack(seqs, 4)
    stream = seqs[0] + seqs[1]
    assert packed.shape == (len(stream) // 4, 4) and packed.flatten().tolist() == stream[:packed.numel()]
    ids, valid = truncate_and_pad(seqs, 8, pad)
    assert ids[0].tolist() == seqs[0] + [pad] * (8 - len(seqs[0])) and valid[0].sum() == len(seqs[0])
    assert ids[1].tolist() == seqs[1][:8] and bool(valid[1].all())

    args = _args(data=files["txt"], tokenizer=files["tokenizer"], validation_split_percentage=0)
    data = load_text_data(args)
    all_ids = [t for s in tokenize_documents(tok, files["docs"]) for t in s]
    assert data.train_valid is None and data.train.shape[1] == 16
    assert data.train.flatten().tolist() == all_ids[:data.train.numel()]
    assert data.train.shape[0] == len(all_ids) // 16
    data = load_text_data(_args(data=files["txt"], tokenizer=files["tokenizer"], packing=False,
                                validation_split_percentage=0))
    assert data.train.shape == (len(files["docs"]), 16) and data.train_valid is not None
    assert bool((data.train[~data.train_valid] == pad).all())


def test_held_out_split_is_deterministic_and_disjoint(files):
    docs = files["docs"]
    train, held = split_documents(docs, 10)
    assert (train, held) == split_documents(docs, 10)
    assert len(held) == 4 and not set(held) & set(train) and sorted(train + held) == sorted(docs)
    assert split_documents(docs, 0) == (docs, [])
    data = load_text_data(_args(data=files["txt"], tokenizer=files["tokenizer"], packing=False,
                                validation_split_percentage=10))
    again = load_text_data(_args(data=files["txt"], tokenizer=files["tokenizer"], packing=False,
                                 validation_split_percentage=10))
    assert torch.equal(data.eval, again.eval) and torch.equal(data.train, again.train)
    assert data.eval.shape[0] == 4 and data.train.shape[0] == len(docs) - 4
    train_rows = {tuple(r) for r in data.train.tolist()}
    assert not any(tuple(r) in train_rows for r in data.eval.tolist())


def test_clear_errors(tmp_path, files):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"train.jsonl:1 has no 'text' field \(it has: 'id', 'body'\).*--text_column"):
        read_documents(files["jsonl"], "text")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        read_documents(str(tmp_path / "data.csv"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no documents"):
        read_documents(str(tmp_path / "empty.txt"))
    saved = tmp_path / "saved"
    saved.mkdir()
    with pytest.MonkeyPatch.context() as patch:  # as without `datasets` installed
        patch.setitem(sys.modules, "datasets", None)
        with pytest.raises(ImportError, match="needs the `datasets` package"):
            read_documents(str(saved))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_text_data(_args(data=files["txt"]))
    with pytest.raises(ValueError, match="no block of --max_length 64"):
        load_text_data(_args(data=files["txt"], tokenizer=files["tokenizer"], seq_len=64))
    with pytest.raises(ValueError, match="4 token embeddings but the tokenizer has"):
        load_model(_llama_config(tmp_path / "small", 4), vocab_size=files["vocab"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"), vocab_size=files["vocab"])
    # udlm cannot leave out a mask id that is not the last one
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"[MASK]": 0, "[EOS]": 1, "x": 2}, unk_token="[MASK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, mask_token="[MASK]", eos_token="[EOS]").save_pretrained(
        tmp_path / "maskfirst")
    with pytest.raises(ValueError, match="not the last id"):
        load_text_data(_args(data=files["txt"], tokenizer=str(tmp_path / "maskfirst")), mask="last_or_none")
    (tmp_path / "masked.txt").write_text("x [MASK] x\n" * 4)
    with pytest.raises(ValueError, match="tokenizes to the mask token id 0"):
        load_text_data(_args(data=str(tmp_path / "masked.txt"), tokenizer=str(tmp_path / "maskfirst"), seq_len=4))


def test_a_model_that_ignores_the_4d_mask_is_refused(tmp_path, files):
    from transformers import LlamaForCausalLM

    from ddiff.training.data import _check_attention

    model = LlamaForCausalLM.from_pretrained(files["weights"])
    model.config.ddiff_attention = "bidirectional"
    _check_attention(model, "bidirectional", None)  # Llama honours the mask
    forward = model.forward
    model.forward = lambda input_ids=None, attention_mask=None, **kw: forward(input_ids=input_ids, **kw)
    with pytest.raises(ValueError, match="ignores ddiff's 4-D attention mask"):
        _check_attention(model, "bidirectional", None)
