"""Checkpoints: atomic layout, the latest pointer, --keep-last, incomplete folders, RNG states, model loading."""

import json
import os
import random

import numpy as np
import pytest
import torch

from megaphi.train import checkpoint as ckpt
from megaphi.train.config import parse_config
from megaphi.train.trainer import Trainer, train


@pytest.fixture
def data(write_token_dataset):
    return write_token_dataset(60)


def run_config(data, save, *extra):
    return parse_config(["--preset", "tiny", "--data-path", data, "--train-iters", "5", "--micro-batch-size", "2",
                         "--global-batch-size", "2", "--seq-length", "16", "--split", "100,0,0", "--eval-iters", "0",
                         "--save", str(save), "--save-interval", "1", "--log-interval", "1", *extra])


def test_layout_latest_pointer_and_keep_last(data, tmp_path):
    save = tmp_path / "ckpt"
    result = train(run_config(data, save, "--keep-last", "2"), progress=False)
    names = sorted(p.name for p in save.iterdir() if p.name.startswith("iter_"))
    assert names == ["iter_0000004", "iter_0000005"]  # pruned to the newest two
    assert (save / "latest").read_text().strip() == "iter_0000005"
    assert result.checkpoint == str(save / "iter_0000005")
    assert sorted(os.listdir(save / "iter_0000005")) == ["meta.json", "model_tp00.pt", "optim_tp00.pt",
                                                         "rng_00000.pt"]
    meta = ckpt.read_meta(save / "iter_0000005")
    assert meta["iteration"] == 5 and meta["consumed_samples"] == 10
    assert meta["config"]["model"]["preset"] == "tiny" and meta["model_config"]["num_layers"] == 2
    assert not [p for p in save.iterdir() if p.name.startswith(".tmp_")]
    # Everything loads with weights_only=True.
    for name in ("model_tp00.pt", "optim_tp00.pt", "rng_00000.pt"):
        torch.load(save / "iter_0000005" / name, weights_only=True)
    assert ckpt.prune(save, 1) == [save / "iter_0000004"]


def test_incomplete_checkpoints_are_ignored_and_cleaned(data, tmp_path):
    save = tmp_path / "ckpt"
    train(run_config(data, save, "--train-iters", "2"), progress=False)
    # A save killed midway: a temp folder with a partial model file; a checkpoint folder never completed.
    partial = save / ".tmp_iter_0000003.99999"
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"\x80\x02partial")
    (save / "iter_0000007").mkdir()  # no meta.json: not a complete checkpoint
    assert [i for i, _ in ckpt.list_checkpoints(save)] == [1, 2]
    assert ckpt.find_checkpoint(save) == save / "iter_0000002"
    # A stale or dangling `latest` falls back to the newest complete checkpoint.
    (save / "latest").write_text("iter_0000009\n")
    assert ckpt.find_checkpoint(save) == save / "iter_0000002"
    (save / "latest").unlink()
    assert ckpt.find_checkpoint(save) == save / "iter_0000002"
    assert ckpt.find_checkpoint(save, 1) == save / "iter_0000001"
    with pytest.raises(ValueError, match="--ckpt-step 7"):
        ckpt.find_checkpoint(save, 7)
    # Resuming loads iteration 2, continues, and the next save removes the temp folder.
    result = train(run_config(data, save, "--train-iters", "3", "--load", str(save)), progress=False)
    assert list(result.losses) == [3]
    assert not partial.exists()
    assert (save / "latest").read_text().strip() == "iter_0000003"


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = ckpt.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpt.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_load_model_matches_the_trained_model(data, tmp_path):
    save = tmp_path / "ckpt"
    trainer = Trainer(run_config(data, save, "--train-iters", "2", "--lr-decay-style", "constant"), progress=False)
    trainer.run()
    model = ckpt.load_model(save)
    ids = torch.randint(0, 500, (2, 16))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), trainer.model(ids), rtol=0, atol=0)
    assert not model.training
    older = ckpt.load_model(save, iteration=1)
    assert not torch.equal(older.lm_head.weight, model.lm_head.weight)
    assert torch.equal(ckpt.load_model(save / "iter_0000001").lm_head.weight, older.lm_head.weight)
    with pytest.raises(ValueError, match="no checkpoint found"):
        ckpt.load_model(tmp_path / "empty")


def test_load_into_a_different_shape_names_the_problem(data, tmp_path):
    save = tmp_path / "ckpt"
    train(run_config(data, save, "--train-iters", "1"), progress=False)
    config = run_config(data, tmp_path / "other", "--train-iters", "2", "--load", str(save), "--num-layers", "3")
    with pytest.raises(ValueError, match=r"--load: checkpoint .*iter_0000001 does not fit this model"):
        Trainer(config, progress=False)


def test_load_without_checkpoint_starts_fresh_but_finetune_needs_one(data, tmp_path):
    empty = tmp_path / "empty"
    result = train(run_config(data, empty, "--train-iters", "1", "--load", str(empty)), progress=False)
    assert list(result.losses) == [1]
    with pytest.raises(ValueError, match=r"--load .*nothing: no checkpoint to fine-tune from"):
        Trainer(run_config(data, tmp_path / "ft", "--load", str(tmp_path / "nothing"), "--finetune"))


def test_meta_is_json_with_layout(data, tmp_path):
    save = tmp_path / "ckpt"
    train(run_config(data, save, "--train-iters", "1"), progress=False)
    meta = json.loads((save / "iter_0000001" / "meta.json").read_text())
    assert meta["layout"] == {"world_size": 1, "tensor_parallel": 1, "data_parallel": 1,
                              "distributed_optimizer": False}
    assert meta["format_version"] == 2 and meta["contents"] == ["model", "optim", "rng"]


@pytest.mark.parametrize("name, damage", [("model_tp00.pt", "truncate"), ("optim_tp00.pt", "delete"),
                                          ("rng_00000.pt", "garbage"), ("meta.json", "garbage")])
def test_a_damaged_checkpoint_names_the_file(data, tmp_path, name, damage):
    save = tmp_path / "ckpt"
    train(run_config(data, save, "--train-iters", "1"), progress=False)
    path = save / "iter_0000001" / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"{not a checkpoint")
    with pytest.raises(ValueError, match=rf"--load: checkpoint file .*iter_0000001/{name} is missing or unreadable"):
        Trainer(run_config(data, save, "--train-iters", "2", "--load", str(save)), progress=False)


def test_a_checkpoint_of_another_shape_is_refused_before_the_model_is_built(data, tmp_path, monkeypatch):
    save = tmp_path / "ckpt"
    train(run_config(data, save, "--train-iters", "1"), progress=False)
    # Other heads give the same weight shapes: load_state_dict would accept them and train a different model.
    config = run_config(data, tmp_path / "other", "--train-iters", "2", "--load", str(save),
                        "--num-attention-heads", "4")
    with pytest.raises(ValueError, match=r"--load: checkpoint .*iter_0000001 does not fit this model: "
                                         r"num_attention_heads 2 in the checkpoint, 4 here \(--num-attention-heads\)"):
        Trainer(config, progress=False)
    # Fine-tuning a tiny checkpoint with the phi-1 preset fails at once, naming the checkpoint's preset.
    monkeypatch.setattr(Trainer, "_build_model_and_optimizer", lambda self: pytest.fail("model built"))
    config = run_config(data, tmp_path / "ft", "--load", str(save), "--finetune", "--preset", "phi-1")
    with pytest.raises(ValueError, match=r"num_layers 2 in the checkpoint, 24 here \(--num-layers\).*"
                                         r"hidden_size 128 in the checkpoint, 2048 here.*saved with --preset tiny"):
        Trainer(config, progress=False)
