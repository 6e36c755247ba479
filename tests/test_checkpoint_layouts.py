"""Checkpoints across parallel layouts (real gloo processes): TP 2 -> 1, 1 -> 4, 2 -> 4, DP 2 -> 1, optimizer states by
name, the recorded layout, atomic saves under SIGKILL, format 1 and weights-only checkpoints."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megaphi.model import ModelConfig, PhiForCausalLM
from megaphi.parallel.state import ParallelContext
from megaphi.train import checkpoint as ckpt
from megaphi.train.optim import param_groups

CONFIG = ModelConfig(vocab_size=256, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                     max_position_embeddings=32, rotary_dim=8)
ROW_SPLIT = ("q_proj", "k_proj", "v_proj", "fc1", "lm_head", "embed_tokens")  # weight and bias: rows (dim 0)
COLUMN_SPLIT = ("dense", "fc2")  # weight: columns (dim 1); bias replicated


def split_dim(name: str) -> int | None:
    module, kind = name.split(".")[-2:]
    return 0 if module in ROW_SPLIT else 1 if module in COLUMN_SPLIT and kind == "weight" else None


def piece(tensor: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    if dim is None or size == 1:
        return tensor
    n = tensor.shape[dim] // size
    return tensor.narrow(dim, rank * n, n)


class ByName:
    """The parallel optimizer's checkpoint interface (state by parameter name, shard shapes) over one AdamW."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, foreach=False)
        self.names = {id(p): n for n, p in model.named_parameters()}

    def state_dict_by_name(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        state = {self.names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in self.optimizer.state.items()}
        return {"param_groups": groups, "state": state}

    def load_state_dict_by_name(self, sd: dict) -> None:
        params = dict(self.model.named_parameters())
        for group, saved in zip(self.optimizer.param_groups, sd["param_groups"]):
            group.update(saved)
        self.optimizer.state.clear()
        for name, s in sd["state"].items():
            self.optimizer.state[params[name]] = {k: v.clone() for k, v in s.items()}


def reference(seed: int = 0) -> tuple[PhiForCausalLM, ByName]:
    """A full model and its optimizer after two AdamW steps on seeded gradients."""
    torch.manual_seed(seed)
    model = PhiForCausalLM(CONFIG)
    opt = ByName(model)
    gen = torch.Generator().manual_seed(seed + 100)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.optimizer.step()
    return model, opt


def expected(tp: int, rank: int) -> tuple[dict, dict]:
    """(weights, optimizer state by name) of TP rank `rank` of `tp`, sliced from the seed-0 reference."""
    model, opt = reference(0)
    weights = {k: piece(v, split_dim(k), rank, tp) for k, v in model.state_dict().items()}
    state = opt.state_dict_by_name()
    for name, s in state["state"].items():
        s["exp_avg"], s["exp_avg_sq"] = (piece(s[k], split_dim(name), rank, tp) for k in ("exp_avg", "exp_avg_sq"))
    return weights, state


def build_rank(tp: int, rank: int, seed: int) -> tuple[PhiForCausalLM, ByName]:
    """TP rank `rank`'s model and optimizer: the seed's reference with sharded parameters carrying their dim."""
    model, opt = reference(seed)
    full = opt.state_dict_by_name()
    if tp > 1:
        for name, param in list(model.named_parameters()):
            dim = split_dim(name)
            if dim is not None:
                module = model.get_submodule(name.rsplit(".", 1)[0])
                sharded = nn.Parameter(piece(param.detach(), dim, rank, tp).clone())
                sharded.tensor_parallel_dim = dim
                setattr(module, name.rsplit(".", 1)[1], sharded)
        for name, s in full["state"].items():
            s["exp_avg"], s["exp_avg_sq"] = (piece(s[k], split_dim(name), rank, tp) for k in ("exp_avg", "exp_avg_sq"))
    opt = ByName(model)
    opt.load_state_dict_by_name(full)
    return model, opt


def assert_rank_state(model: nn.Module, opt: ByName, tp: int, rank: int) -> None:
    """The model and optimizer hold exactly the seed-0 reference's slice for this TP rank."""
    weights, state = expected(tp, rank)
    got = model.state_dict()
    assert got.keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(got[name], value), name
    have = opt.state_dict_by_name()
    assert have["param_groups"] == state["param_groups"]
    assert have["state"].keys() == state["state"].keys()
    for name, s in state["state"].items():
        for key, value in s.items():
            assert torch.equal(have["state"][name][key], value), (name, key)


def make_context(tp: int) -> ParallelContext:
    """Megatron's layout over the initialised world: TP blocks of consecutive ranks, DP across them."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tp_groups = [dist.new_group(list(range(b, b + tp))) for b in range(0, world, tp)]
    dp_groups = [dist.new_group(list(range(r, world, tp))) for r in range(tp)]
    return ParallelContext(rank=rank, world_size=world, local_rank=rank, tp_size=tp, tp_rank=rank % tp,
                           dp_size=world // tp, dp_rank=rank // tp, tp_group=tp_groups[rank // tp],
                           dp_group=dp_groups[rank % tp])


def _worker(rank: int, world: int, store: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, tmp: Path, fn, *args) -> None:
    """fn(*args) in `world` forked gloo processes; a failing rank's traceback is re-raised here."""
    mp.start_processes(_worker, args=(world, str(tmp / f"store_{uuid.uuid4().hex}"), fn, args), nprocs=world,
                       start_method="fork")


def meta_for(distributed_optimizer: bool = False) -> dict:
    return {"model_config": dataclasses.asdict(CONFIG), "consumed_samples": 12,
            "layout": {"distributed_optimizer": distributed_optimizer}}


def save_tp2_and_dp2(root: str) -> None:
    rank = dist.get_rank()
    ctx = make_context(2)
    model, opt = build_rank(2, ctx.tp_rank, seed=0)
    ckpt.save_checkpoint(f"{root}/tp2", 3, model, opt, {"loss_scaler": {"scale": 4.0}}, meta_for(True), ctx=ctx,
                         rng_extra={"seed": 100 + rank})
    ctx = make_context(1)
    model, opt = build_rank(1, 0, seed=0)
    ckpt.save_checkpoint(f"{root}/dp2", 3, model, opt, {"loss_scaler": {"scale": 4.0}}, meta_for(), ctx=ctx)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Checkpoints of the same state saved at TP 1 (one process), TP 2 and DP 2 (two gloo processes)."""
    root = tmp_path_factory.mktemp("layouts")
    model, opt = reference(0)
    ckpt.save_checkpoint(root / "tp1", 3, model, opt, {"loss_scaler": {"scale": 4.0}}, meta_for())
    run_ranks(2, root, save_tp2_and_dp2, str(root))
    return root


def test_files_and_recorded_layout(saved):
    names = sorted(os.listdir(saved / "tp2" / "iter_0000003"))
    assert names == ["meta.json", "model_tp00.pt", "model_tp01.pt", "optim_tp00.pt", "optim_tp01.pt",
                     "rng_00000.pt", "rng_00001.pt"]
    meta = ckpt.read_meta(saved / "tp2" / "iter_0000003")
    assert meta["layout"] == {"world_size": 2, "tensor_parallel": 2, "data_parallel": 1,
                              "distributed_optimizer": True}
    assert meta["partition_dims"] == {k: split_dim(k) for k in PhiForCausalLM(CONFIG).state_dict()
                                      if split_dim(k) is not None}
    assert meta["format_version"] == 2 and meta["iteration"] == 3 and meta["consumed_samples"] == 12
    shard = torch.load(saved / "tp2" / "iter_0000003" / "model_tp01.pt", weights_only=True)
    assert shard["model.layers.0.self_attn.q_proj.weight"].shape == (32, 64)
    assert shard["model.layers.0.mlp.fc2.weight"].shape == (64, 64)
    # DP 2: one model and optimizer file (written by DP rank 0), an RNG file per rank
    assert sorted(os.listdir(saved / "dp2" / "iter_0000003")) == ["meta.json", "model_tp00.pt", "optim_tp00.pt",
                                                                   "rng_00000.pt", "rng_00001.pt"]
    assert ckpt.read_meta(saved / "dp2" / "iter_0000003")["layout"]["data_parallel"] == 2
    assert (saved / "tp2" / "latest").read_text().strip() == "iter_0000003"
    assert not [p for p in (saved / "tp2").iterdir() if p.name.startswith(".tmp_")]


@pytest.mark.parametrize("source", ["tp2", "dp2", "tp1"])
def test_loads_in_one_process(saved, source, capsys):
    model, opt = build_rank(1, 0, seed=1)
    meta, extra = ckpt.load_checkpoint(ckpt.find_checkpoint(saved / source), model, opt)
    assert_rank_state(model, opt, 1, 0)
    assert meta["iteration"] == 3 and extra == {"loss_scaler": {"scale": 4.0}}
    note = capsys.readouterr().out
    assert ("RNG states start from the seed" in note) == (source != "tp1")  # restored only at the same layout


def test_load_model_and_full_state_dict_from_tp2(saved):
    full, _ = expected(1, 0)
    model = ckpt.load_model(saved / "tp2")
    assert not model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, full[name]), name
    config, state = ckpt.load_full_state_dict(saved / "tp2" / "iter_0000003")
    assert config == CONFIG and state.keys() == full.keys()
    assert all(torch.equal(state[k], v) for k, v in full.items())


def reshard_at_four_ranks(root: str) -> None:
    rank = dist.get_rank()
    ctx4 = make_context(4)
    for source in ("tp1", "tp2", "dp2", "v1"):
        model, opt = build_rank(4, rank, seed=1)
        ckpt.load_checkpoint(ckpt.find_checkpoint(f"{root}/{source}"), model, opt, ctx=ctx4)
        assert_rank_state(model, opt, 4, rank)
    # TP 2 x DP 2: saved, then loaded back at the same layout (RNG restored) and at TP 4
    ctx22 = make_context(2)
    model, opt = build_rank(2, ctx22.tp_rank, seed=0)
    ckpt.save_checkpoint(f"{root}/tp2dp2", 5, model, opt, {"loss_scaler": {"scale": 2.0}}, meta_for(), ctx=ctx22,
                         rng_extra={"seed": 100 + rank})
    after_save = torch.rand(4)
    model, opt = build_rank(2, ctx22.tp_rank, seed=1)
    _, extra = ckpt.load_checkpoint(f"{root}/tp2dp2/iter_0000005", model, opt, ctx=ctx22)
    assert torch.equal(torch.rand(4), after_save)
    assert extra == {"loss_scaler": {"scale": 2.0}, "rng_extra": {"seed": 100 + rank}}
    assert_rank_state(model, opt, 2, ctx22.tp_rank)
    model, opt = build_rank(4, rank, seed=1)
    _, extra = ckpt.load_checkpoint(f"{root}/tp2dp2/iter_0000005", model, opt, ctx=ctx4)
    assert "rng_extra" not in extra
    assert_rank_state(model, opt, 4, rank)
    # a damaged shard only some ranks read: every rank fails (no rank waits forever in the next collective)
    model, opt = build_rank(2, ctx22.tp_rank, seed=1)
    own = "model_tp01.pt is missing or unreadable" if ctx22.tp_rank else "failed on 2 other rank"
    with pytest.raises(ValueError, match=own):
        ckpt.load_checkpoint(f"{root}/damaged/iter_0000003", model, opt, ctx=ctx22)
    model, _ = build_rank(4, rank, seed=1)  # weights only, from a converter's TP 2 checkpoint
    ckpt.load_model_state(f"{root}/weights/iter_0000000", model, ctx4)
    weights, _ = expected(4, rank)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def write_format_1(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """A checkpoint as the single-process trainer wrote it before the parallel layouts (format 1)."""
    path.mkdir(parents=True)
    torch.save(model.state_dict(), path / "model.pt")
    torch.save({"optimizer": opt.state_dict(), "loss_scaler": {"scale": 4.0}}, path / "optim.pt")
    torch.save(ckpt.rng_state(), path / "rng.pt")
    meta = {"format_version": 1, "iteration": 3, "model_config": dataclasses.asdict(CONFIG),
            "layout": {"world_size": 1, "tensor_parallel": 1, "data_parallel": 1}}
    (path / "meta.json").write_text(json.dumps(meta))
    (path.parent / "latest").write_text(path.name + "\n")


def test_reshard_to_tp4_and_tp2_by_dp2(saved):
    model, opt = reference(0)
    write_format_1(saved / "v1" / "iter_0000003", model, opt.optimizer)
    ckpt.save_model_checkpoint(saved / "weights", model.state_dict(), CONFIG, tensor_parallel_size=2)
    shutil.copytree(saved / "tp2", saved / "damaged")
    (saved / "damaged" / "iter_0000003" / "model_tp01.pt").write_bytes(b"garbage")
    run_ranks(4, saved, reshard_at_four_ranks, str(saved))
    model, opt = build_rank(1, 0, seed=1)
    ckpt.load_checkpoint(saved / "tp2dp2" / "iter_0000005", model, opt)
    assert_rank_state(model, opt, 1, 0)


def test_format_1_still_loads(tmp_path):
    model, opt = reference(0)
    write_format_1(tmp_path / "v1" / "iter_0000003", model, opt.optimizer)
    loaded = ckpt.load_model(tmp_path / "v1")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    # a plain torch optimizer (the single-process trainer's) resumes through the name mapping too
    other, _ = reference(1)
    plain = torch.optim.AdamW(param_groups(other, 0.1), lr=1e-3, foreach=False)
    meta, extra = ckpt.load_checkpoint(tmp_path / "v1" / "iter_0000003", other, plain)
    assert meta["format_version"] == 1 and extra == {"loss_scaler": {"scale": 4.0}}
    want, got = opt.optimizer.state_dict(), plain.state_dict()
    assert want["param_groups"] == got["param_groups"] and want["state"].keys() == got["state"].keys()
    for i, s in want["state"].items():
        assert all(torch.equal(got["state"][i][k], v) for k, v in s.items())
    # a run on GPUs with the fused AdamW resumes on CPU: implementation flags stay this optimizer's
    optim = torch.load(tmp_path / "v1" / "iter_0000003" / "optim.pt", weights_only=True)
    for group in optim["optimizer"]["param_groups"]:
        group.update(fused=True, foreach=None, lr=5e-4)
    torch.save(optim, tmp_path / "v1" / "iter_0000003" / "optim.pt")
    ckpt.load_checkpoint(tmp_path / "v1" / "iter_0000003", other, plain)
    assert [(g["fused"], g["foreach"], g["lr"]) for g in plain.param_groups] == [(None, False, 5e-4)] * 2
    plain.step()


def test_weights_only_checkpoint(tmp_path):
    model, opt = reference(0)
    path = ckpt.save_model_checkpoint(tmp_path / "w", model.state_dict(), CONFIG, tensor_parallel_size=2,
                                      meta={"source": "test"})
    assert path == tmp_path / "w" / "iter_0000000" and ckpt.find_checkpoint(tmp_path / "w") == path
    assert sorted(os.listdir(path)) == ["meta.json", "model_tp00.pt", "model_tp01.pt"]
    meta = ckpt.read_meta(path)
    assert meta["contents"] == ["model"] and meta["source"] == "test" and meta["layout"]["tensor_parallel"] == 2
    loaded = ckpt.load_model(tmp_path / "w")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    fresh, fresh_opt = reference(1)
    ckpt.load_model_state(path, fresh)  # what --load --finetune does
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(ValueError, match="holds weights only .*--finetune"):
        ckpt.load_checkpoint(path, fresh, fresh_opt)
    with pytest.raises(ValueError, match="tensor_parallel_size=3: .* not divisible by 3"):
        ckpt.save_model_checkpoint(tmp_path / "w3", model.state_dict(), CONFIG, tensor_parallel_size=3)
    bad = {k: v for k, v in model.state_dict().items() if "lm_head" not in k}
    with pytest.raises(ValueError, match=r"does not fit the model config: missing \['lm_head.bias'"):
        ckpt.save_model_checkpoint(tmp_path / "w4", bad, CONFIG)
    assert not (tmp_path / "w3").exists() and not (tmp_path / "w4").exists()


def save_with_unwritable_meta(root: str) -> None:
    """Rank 0 fails to write meta.json (a TypeError, not an OSError): every rank raises, none waits in _agree."""
    ctx = make_context(1)
    model, opt = build_rank(1, 0, seed=0)
    meta = {**meta_for(), "not_json": {1, 2}}
    error = (TypeError, "not JSON serializable") if ctx.rank == 0 else (ValueError, "committing .* failed on 1 other")
    with pytest.raises(error[0], match=error[1]):
        ckpt.save_checkpoint(f"{root}/bad_meta", 1, model, opt, meta=meta, ctx=ctx)
    assert ckpt.list_checkpoints(f"{root}/bad_meta") == []


def test_a_failed_commit_fails_every_rank(tmp_path):
    run_ranks(2, tmp_path, save_with_unwritable_meta, str(tmp_path))


def test_mismatches_and_damage_are_named(saved, tmp_path):
    other = PhiForCausalLM(CONFIG.replace(num_layers=3))
    with pytest.raises(ValueError, match=r"does not fit this model .*missing keys \['model.layers.2"):
        ckpt.load_checkpoint(saved / "tp2" / "iter_0000003", other)
    wider = PhiForCausalLM(CONFIG.replace(ffn_hidden_size=256))
    with pytest.raises(ValueError, match=r"does not fit this model .*fc1.weight is \(128, 64\)"):
        ckpt.load_model_state(saved / "tp2" / "iter_0000003", wider)
    copy = tmp_path / "iter_0000003"
    shutil.copytree(saved / "tp2" / "iter_0000003", copy)
    (copy / "model_tp01.pt").write_bytes((copy / "model_tp01.pt").read_bytes()[:500])
    model, opt = build_rank(1, 0, seed=1)
    with pytest.raises(ValueError, match=r"checkpoint file .*iter_0000003/model_tp01.pt is missing or unreadable"):
        ckpt.load_checkpoint(copy, model, opt)


KILLED_SAVE = """
import sys, time
sys.path.insert(0, {tests!r})
import test_checkpoint_layouts as t
from megaphi.parallel.launch import init_distributed
from megaphi.train import checkpoint as ckpt

init_distributed()
ctx = t.make_context(2)
model, opt = t.build_rank(2, ctx.tp_rank, seed=0)
ckpt.save_checkpoint({folder!r}, 1, model, opt, meta=t.meta_for(), ctx=ctx)

class Stuck(t.ByName):
    def state_dict_by_name(self):
        print("saving", flush=True)
        time.sleep(600)

model, _ = t.build_rank(2, ctx.tp_rank, seed=1)
ckpt.save_checkpoint({folder!r}, 2, model, Stuck(model), meta=t.meta_for(), ctx=ctx)
"""


@pytest.mark.slow  # two fresh interpreters: ~10 s on an idle machine, up to ~30 s on a loaded one
def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE.format(tests=str(Path(__file__).parent), folder=str(folder)))
    port = dist_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        for proc in procs:  # both ranks are inside the second save, past writing their model shards
            line = proc.stdout.readline()
            assert line == "saving\n", line + proc.communicate(timeout=60)[0]
        deadline = time.time() + 30
        while len(list(folder.glob(".tmp_iter_0000002/model_tp*.pt"))) < 2 and time.time() < deadline:
            time.sleep(0.05)
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        for proc in procs:
            proc.kill()
    assert sorted(p.name for p in (folder / ".tmp_iter_0000002").iterdir()) == ["model_tp00.pt", "model_tp01.pt"]
    assert [i for i, _ in ckpt.list_checkpoints(folder)] == [1]
    assert ckpt.find_checkpoint(folder) == folder / "iter_0000001"
    model, opt = build_rank(1, 0, seed=1)
    ckpt.load_checkpoint(ckpt.find_checkpoint(folder), model, opt)
    assert_rank_state(model, opt, 1, 0)
    model, opt = reference(0)
    ckpt.save_checkpoint(folder, 2, model, opt, meta=meta_for())  # the next save clears the leftovers
    assert sorted(p.name for p in folder.iterdir()) == ["iter_0000001", "iter_0000002", "latest"]


def dist_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
