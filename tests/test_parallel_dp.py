"""Data parallelism and ZeRO-1 on two real gloo processes, compared with one process (fp32, tiny phi model).

One pair of worker processes (forked from the test process) plays every two-rank scenario and writes its results; the
tests compare them with single-process runs of the plain torch optimizer computed here.
"""

import contextlib
import functools
import math
import multiprocessing
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megaphi.model import ModelConfig, PhiForCausalLM
from megaphi.parallel.data_parallel import build_parallel_optimizer
from megaphi.parallel.state import ParallelContext
from megaphi.train import optim

CONFIG = dict(vocab_size=256, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
              max_position_embeddings=32, rotary_dim=16)
STEPS, GLOBAL_BATCH, SEQ = 4, 8, 16
LR, WD, BETAS, EPS = 3e-3, 0.1, (0.9, 0.95), 1e-8
BUCKET_MB = 0.05  # ~13k fp32 elements: the 100k-parameter model spreads over several buckets
# (name, distributed optimizer, micro-batch size, clip): 4 samples per rank, so micro 2 accumulates 2 micro-batches
SCENARIOS = [("plain", False, 4, 0.0), ("plain_accum", False, 2, 0.5), ("zero", True, 4, 0.5),
             ("zero_accum", True, 2, 0.0), ("zero_native", True, 2, 0.5)]
PARAM_RTOL = 5e-6  # relative L2 distance per parameter tensor after STEPS Adam steps, fp32 (measured: <= 1.1e-6)
# The key bias barely moves the softmax (a shift of all scores), so its gradient is mostly rounding noise that Adam
# normalises into full-size steps: two equivalent single-process runs (micro-batch 4 vs 2) differ by 1e-4 there.
KEY_BIAS_RTOL = 1e-3
NORM_RTOL = 1e-5
TOY_H, TOY_F = 8, 12


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))


def tiny_model() -> PhiForCausalLM:
    torch.manual_seed(0)
    return PhiForCausalLM(ModelConfig(**CONFIG))


def train_steps(model, opt, batches, micro, clip, steps, parallel=True):
    """The trainer's loop: mean loss per micro-batch / n_micro, no_sync but the last, sync, clip, step; norms."""
    norms = []
    for samples in batches[:steps]:
        opt.zero_grad()
        n = len(samples) // micro
        for i in range(n):
            mb = samples[i * micro : (i + 1) * micro]
            loss = model(mb[:, :-1], labels=mb[:, 1:])
            sync = contextlib.nullcontext() if i == n - 1 or not parallel else opt.no_sync()
            with sync:
                (loss / n).backward()
        if parallel:
            opt.finish_grad_sync()
            norms.append(float(opt.clip_grad_norm(clip)))
        else:
            norms.append(float(optim.clip_grad_norm(list(model.parameters()), clip)))
        opt.step()
    return norms


@functools.cache
def reference(micro, clip, steps=STEPS):
    """Single process, torch's own AdamW from optim.build_optimizer: (norms, parameters)."""
    model = tiny_model()
    opt = optim.build_optimizer(model, LR, WD, BETAS, EPS)
    norms = train_steps(model, opt, list(tokens()), micro, clip, steps, parallel=False)
    return norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def toy_tensors() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"ln.weight": 1 + 0.1 * torch.randn(TOY_H, generator=g), "ln.bias": 0.1 * torch.randn(TOY_H, generator=g),
            "w.weight": torch.randn(TOY_F, TOY_H, generator=g), "v.weight": torch.randn(TOY_H, TOY_F, generator=g),
            "c": torch.randn(TOY_H, generator=g)}


class Toy(nn.Module):
    """A fake TP model: w split by rows (dim 0), v by columns (dim 1), LayerNorm with partial (SP-like) grads."""

    def __init__(self, tp_rank=0, tp_size=1):
        super().__init__()
        full = toy_tensors()
        rows = slice(tp_rank * TOY_F // tp_size, (tp_rank + 1) * TOY_F // tp_size)
        self.ln = nn.LayerNorm(TOY_H)
        self.w = nn.Linear(TOY_H, TOY_F // tp_size, bias=False)
        self.v = nn.Linear(TOY_F // tp_size, TOY_H, bias=False)
        self.c = nn.Parameter(full["c"].clone())
        with torch.no_grad():
            self.ln.weight.copy_(full["ln.weight"])
            self.ln.bias.copy_(full["ln.bias"])
            self.w.weight.copy_(full["w.weight"][rows])
            self.v.weight.copy_(full["v.weight"][:, rows])
        self.w.weight.tensor_parallel_dim, self.v.weight.tensor_parallel_dim = 0, 1
        self.ln.weight.sequence_parallel_grad = self.ln.bias.sequence_parallel_grad = True

    def forward(self, x):
        # Each TP rank's loss is its share of the full loss plus the replicated term, which every rank computes:
        # so w/v grads are exact shards, LayerNorm grads partial sums, c's grad complete on every rank.
        h = self.ln(x)
        n = x.shape[0] * TOY_F
        return ((h @ self.w.weight.t()).square().sum() + (h @ self.v.weight).square().sum()) / n \
            + 0.5 * (self.c - 1).square().sum()


def toy_input() -> torch.Tensor:
    return torch.randn(6, TOY_H, generator=torch.Generator().manual_seed(4))


# ---------------------------------------------------------------- the two-rank worker

class Recorder:
    """Counts torch.distributed collectives (wrapping the functions, which still run) and records events."""

    NAMES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather", "all_gather_into_tensor",
             "all_gather_single", "broadcast")

    def __init__(self):
        self.count = 0
        self.events = None  # a list while recording the order of gradients and launches

    def install(self):
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            self.count += 1
            if self.events is not None:
                self.events.append(("launch", name))
            return fn(*args, **kwargs)
        return wrapped


def _dp_scenarios(rank, ctx, recorder, batches, out):
    share = [b[rank * GLOBAL_BATCH // 2 : (rank + 1) * GLOBAL_BATCH // 2] for b in batches]
    for name, zero, micro, clip in SCENARIOS:
        model = tiny_model()
        opt = build_parallel_optimizer(model, ctx, LR, WD, BETAS, EPS, zero, BUCKET_MB)
        if name == "zero_native":
            opt.grads.native = True  # gloo in recent torch has reduce_scatter/all_gather_into_tensor: the nccl path
        out[name] = {"norms": train_steps(model, opt, share, micro, clip, STEPS), "buckets": len(opt.grads.buckets),
                     "stepped": sum(t.numel() for g in opt.param_groups for t in g["params"]),
                     "states": sum(s["exp_avg"].numel() for s in opt.optimizer.state.values()),
                     "params": {n: p.detach().clone() for n, p in model.named_parameters()}}

    # Collectives of one accumulation step, and the order of gradients and bucket launches in the last backward.
    model = tiny_model()
    opt = build_parallel_optimizer(model, ctx, LR, WD, BETAS, EPS, False, BUCKET_MB)
    for n, p in model.named_parameters():  # registered after the optimizer's hooks, so they run after them
        p.register_post_accumulate_grad_hook(
            lambda p, n=n: recorder.events.append(("grad", n)) if recorder.events is not None else None)
    opt.zero_grad()
    counts = [recorder.count]
    for i, mb in enumerate((share[0][:2], share[0][2:])):
        loss = model(mb[:, :-1], labels=mb[:, 1:])
        if i == 0:
            with opt.no_sync():
                (loss / 2).backward()
        else:
            recorder.events = []
            (loss / 2).backward()
            out["events"] = recorder.events
            recorder.events = None
        counts.append(recorder.count)
    opt.finish_grad_sync()
    counts.append(recorder.count)
    out["counts"], out["count_buckets"] = counts, len(opt.grads.buckets)

    # Optimizer states across layouts: ZeRO -> plain and plain -> ZeRO at DP 2, and DP 1 -> DP 2 (ZeRO).
    for first, second in ((True, False), (False, True), (None, True)):
        model = tiny_model()
        if first is None:
            saved = torch.load(out["dir"] / "dp1_step2.pt")
            model.load_state_dict(saved["model"])
            sd = saved["optimizer"]
        else:
            opt = build_parallel_optimizer(model, ctx, LR, WD, BETAS, EPS, first, BUCKET_MB)
            train_steps(model, opt, share, 4, 0.0, 2)
            sd = opt.state_dict_by_name()
            out[f"sd_{'zero' if first else 'plain'}"] = sd
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        model = tiny_model()
        model.load_state_dict(params)
        opt = build_parallel_optimizer(model, ctx, LR, WD, BETAS, EPS, second, BUCKET_MB)
        opt.load_state_dict_by_name(sd)
        train_steps(model, opt, share[2:], 4, 0.0, 2)
        out[f"resumed_{first}_{second}"] = {n: p.detach().clone() for n, p in model.named_parameters()}


def _tp_scenarios(rank, ctx, out):
    for zero in (False, True):
        model = Toy(rank, 2)
        opt = build_parallel_optimizer(model, ctx, LR, WD, BETAS, EPS, zero, BUCKET_MB)
        opt.zero_grad()
        model(toy_input()).backward()
        opt.finish_grad_sync()
        ln_grads = {n: model.get_parameter(n).grad.clone() for n in ("ln.weight", "ln.bias")}
        norm = float(opt.clip_grad_norm(1.0))
        opt.step()
        out[f"tp_{zero}"] = {"ln_grads": ln_grads, "norm": norm,
                             "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def worker(rank: int, port: int, folder: Path) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        group = dist.new_group([0, 1])
        recorder = Recorder()
        recorder.install()
        out = {"dir": folder}
        dp = ParallelContext(rank=rank, world_size=2, local_rank=rank, dp_size=2, dp_rank=rank, dp_group=group)
        _dp_scenarios(rank, dp, recorder, list(tokens()), out)
        tp = ParallelContext(rank=rank, world_size=2, local_rank=rank, tp_size=2, tp_rank=rank, tp_group=group)
        _tp_scenarios(rank, tp, out)
        del out["dir"]
        torch.save(out, folder / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        (folder / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


# ---------------------------------------------------------------- tests

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes: threads only fight the worker processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both ranks' results of every scenario (one pair of processes for the whole module)."""
    folder = tmp_path_factory.mktemp("dp")
    model = tiny_model()  # the DP 1 -> DP 2 checkpoint: two single-process steps
    opt = build_parallel_optimizer(model, None, LR, WD, BETAS, EPS, False, BUCKET_MB)
    train_steps(model, opt, list(tokens()), 4, 0.0, 2)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict_by_name()}, folder / "dp1_step2.pt")
    # Forked from this process, the workers start with torch already imported: 3x faster than fresh interpreters.
    fork = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [fork.Process(target=worker, args=(rank, port, folder)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    for rank, p in enumerate(procs):
        error = folder / f"rank{rank}.err"
        assert p.exitcode == 0, error.read_text() if error.exists() else f"rank {rank}: exit code {p.exitcode}"
    return [torch.load(folder / f"rank{rank}.pt") for rank in (0, 1)]


def assert_params_close(got: dict, want: dict, rtol=PARAM_RTOL):
    assert got.keys() == want.keys()
    for name in want:
        err = float((got[name] - want[name]).norm() / want[name].norm())
        tol = KEY_BIAS_RTOL if name.endswith("k_proj.bias") else rtol
        assert err <= tol, f"{name}: relative L2 error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("name,zero,micro,clip", SCENARIOS)
def test_two_ranks_match_one_process(runs, name, zero, micro, clip):
    ref_norms, ref_params = reference(micro, clip)
    if clip:
        assert max(ref_norms) > clip  # the clipping is exercised
    for out in runs:
        assert out[name]["buckets"] > 2
        assert out[name]["norms"] == pytest.approx(ref_norms, rel=NORM_RTOL)
        assert_params_close(out[name]["params"], ref_params)
    assert runs[0][name]["norms"] == runs[1][name]["norms"]  # the norm is identical on all ranks
    total = sum(p.numel() for p in ref_params.values())
    stepped = [out[name]["stepped"] for out in runs]
    assert [out[name]["states"] for out in runs] == stepped
    assert sum(stepped) == total if zero else stepped == [total, total]  # ZeRO: each element on one rank only


def test_single_process_matches_torch_optimizer():
    ref_norms, ref_params = reference(2, 0.5)
    for zero in (False, True):
        model = tiny_model()
        opt = build_parallel_optimizer(model, None, LR, WD, BETAS, EPS, zero, BUCKET_MB)
        norms = train_steps(model, opt, list(tokens()), 2, 0.5, STEPS)
        assert norms == pytest.approx(ref_norms, rel=NORM_RTOL)
        assert_params_close({n: p.detach() for n, p in model.named_parameters()}, ref_params)


def test_accumulation_communicates_only_from_the_last_backward(runs):
    for out in runs:
        before, after_no_sync, after_last, after_finish = out["counts"]
        assert after_no_sync == before  # nothing at all under no_sync()
        assert after_last > after_no_sync  # the hooks launched buckets during the last backward
        assert after_finish - before == out["count_buckets"]  # one all-reduce per bucket in all


def test_first_bucket_launches_before_backward_ends(runs):
    for out in runs:
        events = out["events"]
        first_launch = next(i for i, e in enumerate(events) if e[0] == "launch")
        grads = [e for e in events if e[0] == "grad"]
        grads_after = [e for e in events[first_launch:] if e[0] == "grad"]
        assert len(grads_after) > len(grads) // 2, events  # most gradients were still to come


def _compare_state(a: dict, b: dict, rtol=1e-6):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for name in a["state"]:
        sa, sb = a["state"][name], b["state"][name]
        assert sa.keys() == sb.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert float(sa["step"]) == float(sb["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert sa[key].shape == sb[key].shape
            assert float((sa[key] - sb[key]).norm()) <= rtol * float(sb[key].norm()) + 1e-12, (name, key)


def test_state_dict_same_structure_plain_and_zero(runs):
    for out in runs:
        _compare_state(out["sd_zero"], out["sd_plain"])
        assert float(out["sd_zero"]["state"]["lm_head.weight"]["step"]) == 2
    assert len(runs[0]["sd_plain"]["state"]) == len(list(tiny_model().parameters()))


def test_state_dict_moves_between_layouts(runs, tmp_path):
    _, ref_params = reference(4, 0.0)
    for out in runs:
        for first, second in ((True, False), (False, True), (None, True)):
            assert_params_close(out[f"resumed_{first}_{second}"], ref_params)
    # DP 2 (ZeRO) -> DP 1, plain and ZeRO
    batches = list(tokens())
    for zero in (False, True):
        model = tiny_model()
        opt = build_parallel_optimizer(model, None, LR, WD, BETAS, EPS, True, BUCKET_MB)
        train_steps(model, opt, batches, 4, 0.0, 2)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        model = tiny_model()
        model.load_state_dict(params)
        opt = build_parallel_optimizer(model, None, LR, WD, BETAS, EPS, zero, BUCKET_MB)
        opt.load_state_dict_by_name(runs[0]["sd_zero"])
        train_steps(model, opt, batches[2:], 4, 0.0, 2)
        assert_params_close({n: p.detach() for n, p in model.named_parameters()}, ref_params)


def test_load_rejects_other_layouts():
    model = tiny_model()
    opt = build_parallel_optimizer(model, None, LR, WD, BETAS, EPS)
    train_steps(model, opt, list(tokens()), 8, 0.0, 1)
    sd = opt.state_dict_by_name()
    sd["state"]["lm_head.weight"]["exp_avg"] = sd["state"]["lm_head.weight"]["exp_avg"][:128]
    with pytest.raises(ValueError, match="lm_head.weight.exp_avg has shape"):
        opt.load_state_dict_by_name(sd)
    del sd["state"]["lm_head.bias"]
    with pytest.raises(ValueError, match="missing"):
        opt.load_state_dict_by_name(sd)


def test_load_keeps_this_machines_implementation_flags():
    """A plain torch state (format 1) holds fused=/foreach= of the machine that saved it: only hyperparameters load."""
    from megaphi.train.checkpoint_shards import torch_optimizer_state_by_name

    model = tiny_model()
    saved_opt = torch.optim.AdamW(optim.param_groups(model, WD), lr=LR, betas=BETAS, eps=EPS, fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    saved_opt.step()
    sd = torch_optimizer_state_by_name(saved_opt, model)
    for zero in (False, True):
        opt = build_parallel_optimizer(model, None, LR / 2, WD, BETAS, EPS, zero, BUCKET_MB)
        before = [{k: g.get(k) for k in ("fused", "foreach")} for g in opt.param_groups]
        opt.load_state_dict_by_name(sd)
        assert [{k: g.get(k) for k in ("fused", "foreach")} for g in opt.param_groups] == before
        assert [g["lr"] for g in opt.param_groups] == [LR, LR]
        opt.step()  # fused and foreach together would raise here


def test_fake_tensor_parallel_norm_and_sequence_parallel_grads(runs):
    full = Toy()
    opt = optim.build_optimizer(full, LR, WD, BETAS, EPS)
    full(toy_input()).backward()
    ln_grads = {n: full.get_parameter(n).grad.clone() for n in ("ln.weight", "ln.bias")}
    norm = float(optim.clip_grad_norm(list(full.parameters()), 1.0))
    assert norm > 1.0
    opt.step()
    want = dict(full.named_parameters())
    for rank, out in enumerate(runs):
        rows = slice(rank * TOY_F // 2, (rank + 1) * TOY_F // 2)
        shard = {"w.weight": want["w.weight"][rows], "v.weight": want["v.weight"][:, rows]}
        for zero in (False, True):
            got = out[f"tp_{zero}"]
            for n in ln_grads:  # partial grads summed over TP
                torch.testing.assert_close(got["ln_grads"][n], ln_grads[n], rtol=1e-5, atol=1e-6)
            assert got["norm"] == pytest.approx(norm, rel=NORM_RTOL)
            assert_params_close(got["params"], {n: shard.get(n, p).detach() for n, p in want.items()})


def test_misuse_is_reported():
    model = tiny_model()
    with pytest.raises(ValueError, match="--ddp-bucket-size-mb"):
        build_parallel_optimizer(model, None, LR, WD, BETAS, EPS, bucket_size_mb=0)
    with pytest.raises(ValueError, match="fp32"):
        build_parallel_optimizer(tiny_model().to(torch.bfloat16), None, LR, WD, BETAS, EPS)
    opt = build_parallel_optimizer(model, None, LR, WD, BETAS, EPS)
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="gradient buffer"):
        opt.finish_grad_sync()
    opt.zero_grad()  # points the grads back into the buffer
    opt.finish_grad_sync()
    assert math.isclose(float(opt.clip_grad_norm(0.0)), 0.0)
    opt = build_parallel_optimizer(model, None, LR, WD, BETAS, EPS, distributed_optimizer=True)
    model.lm_head.weight.data = model.lm_head.weight.detach().clone()
    with pytest.raises(RuntimeError, match="lm_head.weight no longer lives"):
        opt.step()

