"""Tensor and sequence parallelism against the single-process model, in real gloo processes on 127.0.0.1.

One start of 4 processes (forked, so they skip importing torch again) builds three layouts (TP=4; TP=2 x DP=2;
TP=2 x DP=2 with sequence parallelism) and measures everything collectively; the tests below assert on the numbers
each rank wrote. Workers never assert (a rank failing between collectives would hang the others). fp32 tolerance:
1e-5 relative to the largest reference value of each tensor.
"""

import copy
import json
from collections import Counter
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megaphi.kernels import reference
from megaphi.model import ModelConfig, PhiForCausalLM
from megaphi.model.phi import KVCache
from megaphi.parallel.groups import RankLayout, build_parallel_context, check_layout
from megaphi.parallel.layers import VocabParallelLMHead, shard
from megaphi.parallel.mappings import all_gather, copy_to_tp, count_collectives, reduce_scatter
from megaphi.parallel.random import get_tracker
from megaphi.parallel.state import ParallelContext
from megaphi.parallel.tensor_parallel import apply_tensor_parallel

WORLD = 4
LAYOUTS = {"tp4": (4, False), "tp2": (2, False), "tp2_sp": (2, True)}
CONFIG = dict(vocab_size=250, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
              max_position_embeddings=32, rotary_dim=8)  # vocab padded to 256
BATCH, SEQ = 2, 16
TOL = 1e-5
BSH_BYTES = BATCH * SEQ * CONFIG["hidden_size"] * 4


def rel_err(a, b) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def full_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return PhiForCausalLM(ModelConfig(**{**CONFIG, **overrides}))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=g)
    labels = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=g)
    labels[0, :3] = -100
    return ids, labels


def reduced_grad(p, ctx):
    """p's gradient, summed over TP when it acts on sequence shards (the DP helper's job in training)."""
    g = p.grad.clone()
    if getattr(p, "sequence_parallel_grad", False):
        dist.all_reduce(g, group=ctx.tp_group)
    return g


def measure_equivalence(ctx):
    ids, labels = batch()
    full = full_model()
    tp = apply_tensor_parallel(copy.deepcopy(full), ctx)
    out = {"same_keys": sorted(tp.state_dict()) == sorted(full.state_dict())}
    full_loss, tp_loss = full(ids, labels), tp(ids, labels)
    full_loss.backward()
    tp_loss.backward()
    out["loss"] = rel_err(tp_loss, full_loss)
    full_params = dict(full.named_parameters())
    out["grads"] = {}
    for name, p in tp.named_parameters():
        ref = full_params[name].grad
        if hasattr(p, "tensor_parallel_dim"):
            ref = shard(ref, p.tensor_parallel_dim, ctx.tp_rank, ctx.tp_size)
        out["grads"][name] = rel_err(reduced_grad(p, ctx), ref) if p.shape == ref.shape else float("inf")
    full.eval(), tp.eval()
    with torch.no_grad():
        out["logits"] = rel_err(tp(ids), full(ids))
        # Eval mode runs SP models unsplit: a 10-token prompt and single tokens need not divide by TP.
        caches = [KVCache(CONFIG["num_layers"], BATCH, SEQ) for _ in range(2)]
        steps = [(m(ids[:, :10], kv_cache=c), *(m(ids[:, i:i + 1], kv_cache=c) for i in range(10, 13)))
                 for m, c in zip((tp, full), caches)]
        out["decode"] = max(rel_err(a, b) for a, b in zip(*steps))
    return out


def measure_cross_entropy(ctx):
    g = torch.Generator().manual_seed(2)
    n, h, vocab = 24, 32, 64 * ctx.tp_size
    hidden, weight, bias = (torch.randn(*s, generator=g) for s in ((n, h), (vocab, h), (vocab,)))
    labels = torch.randint(0, vocab, (4, 6), generator=g)
    labels[1, 2:5] = -7
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for reduction in ("mean", "sum", "none"):
            for chunk in (1 << 26, 3 * 64):  # one chunk; three tokens per chunk
                reference.VOCAB_PARALLEL_CE_CHUNK_ELEMENTS = chunk
                leaves = [t.to(dtype).clone().requires_grad_() for t in (hidden, weight, bias)]
                ref = reference.linear_cross_entropy(leaves[0].view(4, 6, h), leaves[1], leaves[2], labels, -7,
                                                     reduction)
                shards = [shard(t, 0, ctx.tp_rank, ctx.tp_size).requires_grad_() for t in leaves[1:]]
                hid = leaves[0].detach().clone().requires_grad_()
                got = reference.linear_cross_entropy(copy_to_tp(hid, ctx.tp_group).view(4, 6, h), *shards, labels,
                                                     -7, reduction, ctx.tp_group)
                weights = torch.randn(ref.shape, generator=g)
                (ref.float() * weights).sum().backward()
                (got.float() * weights).sum().backward()
                key = f"{str(dtype)[6:]}/{reduction}/{'chunked' if chunk < 1 << 20 else 'whole'}"
                out[key] = {"shape": list(got.shape) == list(ref.shape), "loss": rel_err(got, ref),
                            "hidden": rel_err(hid.grad, leaves[0].grad),
                            "weight": rel_err(shards[0].grad, shard(leaves[1].grad, 0, ctx.tp_rank, ctx.tp_size)),
                            "bias": rel_err(shards[1].grad, shard(leaves[2].grad, 0, ctx.tp_rank, ctx.tp_size))}
    reference.VOCAB_PARALLEL_CE_CHUNK_ELEMENTS = 1 << 26
    ignored = torch.full((n,), -100)
    out["all_ignored_mean_is_nan"] = [
        bool(torch.isnan(reference.linear_cross_entropy(hidden, shard(weight, 0, ctx.tp_rank, ctx.tp_size),
                                                        shard(bias, 0, ctx.tp_rank, ctx.tp_size), ignored,
                                                        process_group=ctx.tp_group))),
        bool(torch.isnan(F.cross_entropy(F.linear(hidden, weight, bias), ignored)))]
    return out


def measure_collectives_per_layer(ctx):
    """Collectives of one more layer (forward, backward): counts at 2 layers minus counts at 1 layer."""
    ids, labels = batch()
    runs = []
    for layers in (1, 2):
        model = apply_tensor_parallel(full_model(num_layers=layers), ctx)
        with count_collectives() as fwd:
            loss = model(ids, labels)
        with count_collectives() as bwd:
            loss.backward()
        runs.append((dict(fwd), dict(bwd)))
    per_layer = {}
    for phase, (one, two) in zip(("forward", "backward"), zip(*runs)):
        per_layer[phase] = {op: {k: two[op][k] - one.get(op, {}).get(k, 0) for k in ("calls", "bytes")}
                            for op in two if two[op] != one.get(op)}
    return per_layer


def measure_wrapped_collectives(ctx):
    """Every torch.distributed call made by one more layer, seen by wrapping the collectives from outside."""
    names = ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_to_all", "all_gather_into_tensor",
             "reduce_scatter_tensor", "send", "recv")
    originals = {name: getattr(dist, name) for name in names if hasattr(dist, name)}
    calls: list[tuple[str, str, int]] = []

    def wrap(name, fn):
        def counted(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            group = kwargs.get("group", args[2] if name == "all_gather" and len(args) > 2 else None)
            calls.append((name, "tp" if group is ctx.tp_group else "other", tensor.numel() * tensor.element_size()))
            return fn(*args, **kwargs)
        return counted

    ids, labels = batch()
    runs = []
    try:
        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        for layers in (1, 2):
            model = apply_tensor_parallel(full_model(num_layers=layers), ctx)
            calls.clear()
            loss = model(ids, labels)
            forward = list(calls)
            calls.clear()
            loss.backward()
            runs.append((forward, list(calls)))
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    per_layer = {}
    for phase, (one, two) in zip(("forward", "backward"), zip(*runs)):
        extra = Counter(f"{name}/{group}:{size}" for name, group, size in two)  # the layer's own calls
        extra.subtract(f"{name}/{group}:{size}" for name, group, size in one)
        found: dict[str, list[int]] = {}
        for key, n in extra.items():
            op, size = key.rsplit(":", 1)
            found.setdefault(op, []).extend([int(size)] * n)
        per_layer[phase] = {op: sorted(sizes) for op, sizes in found.items() if sizes}
    return per_layer


def measure_native_collectives(ctx):
    """The tensor collectives (NCCL's path; gloo has them too) give what gloo's fallbacks give, in rank order."""
    x = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3) * (ctx.tp_rank + 1)  # integers: exact sums
    out = {}
    for dim in (0, 1, 2):
        gathered = [all_gather(x, dim, ctx.tp_group, native) for native in (True, False)]
        expected = torch.cat([x / (ctx.tp_rank + 1) * (r + 1) for r in range(ctx.tp_size)], dim)
        out[f"all_gather/{dim}"] = torch.equal(gathered[0], expected) and torch.equal(gathered[1], expected)
    scattered = [reduce_scatter(x, 1, ctx.tp_group, native) for native in (True, False)]
    total = x / (ctx.tp_rank + 1) * sum(range(1, ctx.tp_size + 1))
    expected = total.chunk(ctx.tp_size, 1)[ctx.tp_rank]
    out["reduce_scatter/1"] = torch.equal(scattered[0], expected) and torch.equal(scattered[1], expected)
    return out


def measure_rng(ctx):
    tracker = get_tracker()
    tracker.set_seed(1234, ctx.tp_rank)
    torch.manual_seed(7)
    with tracker.fork("cpu"):
        first = torch.rand(6)
    default_after = torch.rand(3)  # the default stream continues alike on every rank
    torch.manual_seed(7)
    state = tracker.get_state()
    tracker.set_seed(99, ctx.tp_rank)
    tracker.set_state(state)
    with tracker.fork("cpu"):
        again = torch.rand(6)
    return {"mask": first.tolist(), "default_after": default_after.tolist(), "reproducible": torch.equal(first, again)}


def measure_dropout_recompute(ctx):
    """With dropout on, activation recomputation replays the same masks (equal loss and gradients)."""
    ids, labels = batch()
    # A wider init than phi's 0.02, so that the logits (and dropout's effect on the loss) are not negligible.
    drop = dict(hidden_dropout=0.2, attention_dropout=0.2, embedding_dropout=0.2, init_std=0.2)
    runs = []
    for recompute in (False, True):
        model = apply_tensor_parallel(full_model(**drop), ctx)
        model.set_activation_checkpointing(recompute)
        get_tracker().set_seed(1234, ctx.tp_rank)
        torch.manual_seed(5)
        loss = model(ids, labels)
        loss.backward()
        runs.append((loss, {n: reduced_grad(p, ctx) for n, p in model.named_parameters()}))
    hidden = model.model(ids)
    out = {"loss": rel_err(runs[1][0], runs[0][0]),
           "grads": max(rel_err(runs[1][1][n], runs[0][1][n]) for n in runs[0][1])}
    no_drop = apply_tensor_parallel(full_model(init_std=0.2), ctx)(ids, labels)
    out["dropout_changes_loss"] = rel_err(runs[0][0], no_drop) > 1e-3
    if not ctx.sequence_parallel:  # the hidden state is replicated: the same masks on every TP rank
        gathered = [torch.empty_like(hidden) for _ in range(ctx.tp_size)]
        dist.all_gather(gathered, hidden.detach().contiguous(), group=ctx.tp_group)
        out["replicated_hidden_spread"] = max(rel_err(t, gathered[0]) for t in gathered)
    return out


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                           timeout=timedelta(seconds=120))
    contexts = {name: build_parallel_context(tp, sp) for name, (tp, sp) in LAYOUTS.items()}
    result = {"layout": {name: [c.tp_rank, c.dp_rank, c.tp_size, c.dp_size] for name, c in contexts.items()}}
    result["equivalence"] = {name: measure_equivalence(c) for name, c in contexts.items()}
    result["cross_entropy"] = {name: measure_cross_entropy(contexts[name]) for name in ("tp2", "tp4")}
    result["collectives"] = {name: measure_collectives_per_layer(contexts[name]) for name in ("tp2", "tp2_sp")}
    result["wrapped"] = {name: measure_wrapped_collectives(contexts[name]) for name in ("tp2", "tp2_sp")}
    result["native"] = measure_native_collectives(contexts["tp4"])
    result["rng"] = measure_rng(contexts["tp2"])
    result["dropout"] = {name: measure_dropout_recompute(contexts[name]) for name in ("tp2", "tp2_sp")}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 4 ranks measured (a list indexed by global rank)."""
    out_dir = tmp_path_factory.mktemp("tp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers inherit the imported modules (spawn would import torch four more times: most of the time)
    mp.start_processes(_worker, args=(port, str(out_dir)), nprocs=WORLD, join=True, start_method="fork")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_groups_follow_megatron_layout(ranks):
    for rank, r in enumerate(ranks):
        assert r["layout"]["tp4"] == [rank, 0, 4, 1]
        assert r["layout"]["tp2"] == r["layout"]["tp2_sp"] == [rank % 2, rank // 2, 2, 2]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_loss_grads_and_logits_match_single_process(ranks, layout):
    for rank, r in enumerate(ranks):
        m = r["equivalence"][layout]
        assert m["same_keys"], f"rank {rank}: state_dict keys differ from the plain model's"
        assert m["loss"] < TOL, f"rank {rank}: loss off by {m['loss']:.2e}"
        bad = {n: e for n, e in m["grads"].items() if not e < TOL}
        assert not bad, f"rank {rank}: gradients off (relative error): {bad}"
        assert len(m["grads"]) == 5 + 14 * CONFIG["num_layers"]
        assert m["logits"] < TOL
        assert m["decode"] < TOL


@pytest.mark.parametrize("group", ["tp2", "tp4"])
def test_vocab_parallel_cross_entropy_matches_plain(ranks, group):
    for rank, r in enumerate(ranks):
        m = r["cross_entropy"][group]
        assert all(m.pop("all_ignored_mean_is_nan"))
        for case, errs in m.items():
            tol = TOL if case.startswith("float32") else 2e-2  # bf16: both round the logits to bf16
            assert errs.pop("shape"), case
            assert all(e < tol for e in errs.values()), f"rank {rank} {case}: {errs}"


def test_collectives_per_layer_are_megatrons(ranks):
    # Per layer: attention and MLP each enter (f) and leave (g) a TP region once.
    two = {"calls": 2, "bytes": 2 * BSH_BYTES}
    for r in ranks:
        tp, sp = r["collectives"]["tp2"], r["collectives"]["tp2_sp"]
        assert tp == {"forward": {"all_reduce": two}, "backward": {"all_reduce": two}}
        assert sp == {"forward": {"all_gather": two, "reduce_scatter": two},
                      "backward": {"all_gather": two, "reduce_scatter": two}}
        # Ring volume: an all-reduce moves twice what an all-gather or a reduce-scatter of the same tensor does.
        for phase in ("forward", "backward"):
            assert 2 * tp[phase]["all_reduce"]["bytes"] == sum(op["bytes"] for op in sp[phase].values())


def test_collectives_seen_through_wrapped_torch_distributed(ranks):
    # The same volumes counted from outside megaphi: every torch.distributed call is wrapped, so a collective issued
    # anywhere (not only through megaphi.parallel.mappings) would show up, as would one on another group.
    for r in ranks:
        tp, sp = r["wrapped"]["tp2"], r["wrapped"]["tp2_sp"]
        for phase in ("forward", "backward"):
            assert tp[phase] == {"all_reduce/tp": [BSH_BYTES, BSH_BYTES]}
            # gloo: all_gather takes the sequence shard; reduce-scatter is an all-reduce of the full tensor + slice.
            assert sp[phase] == {"all_gather/tp": [BSH_BYTES // 2] * 2, "all_reduce/tp": [BSH_BYTES] * 2}


def test_tensor_collectives_match_gloo_fallbacks(ranks):
    for rank, r in enumerate(ranks):
        assert all(r["native"].values()), f"rank {rank}: {r['native']}"


def test_tp_dropout_rng_distinct_per_tp_rank_and_reproducible(ranks):
    masks = [r["rng"]["mask"] for r in ranks]
    assert masks[0] == masks[2] and masks[1] == masks[3]  # same TP rank (in another DP group): same stream
    assert masks[0] != masks[1]
    assert all(r["rng"]["reproducible"] for r in ranks)
    assert all(r["rng"]["default_after"] == ranks[0]["rng"]["default_after"] for r in ranks)


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp"])
def test_activation_recomputation_replays_tp_dropout(ranks, layout):
    for r in ranks:
        m = r["dropout"][layout]
        assert m["dropout_changes_loss"]
        assert m["loss"] < 1e-6 and m["grads"] < 1e-6, m
        assert m.get("replicated_hidden_spread", 0.0) == 0.0


def test_rank_layout_lists():
    layout = RankLayout(8, 2)
    assert layout.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.dp_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with_pp = RankLayout(8, 2, pp_size=2)
    assert with_pp.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert with_pp.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert with_pp.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert with_pp.coordinates(7) == (1, 1, 1) and with_pp.rank(1, 1, 1) == 7


@pytest.mark.parametrize("change,tp,world,match", [
    ({}, 3, 4, "--tensor-model-parallel-size=3 .* must divide the number of processes, 4"),
    ({}, 0, 4, "--tensor-model-parallel-size must be a positive integer, got 0"),
    ({"num_attention_heads": 2, "rotary_dim": 8}, 4, 4, "--num-attention-heads=2 must be divisible"),
    ({"vocab_size": 250, "make_vocab_size_divisible_by": 2}, 4, 8, "padded vocabulary \\(250 rows\\)"),
    ({"ffn_hidden_size": 130}, 4, 4, "--ffn-hidden-size=130"),
])
def test_check_layout_errors(change, tp, world, match):
    with pytest.raises(ValueError, match=match):
        check_layout(ModelConfig(**{**CONFIG, **change}), tp, world)


def test_check_layout_sequence_length_and_good_layouts():
    config = ModelConfig(**CONFIG)
    with pytest.raises(ValueError, match="--seq-length=10 must be divisible"):
        check_layout(config, 4, 4, sequence_parallel=True, seq_length=10)
    check_layout(config, 4, 8, sequence_parallel=True, seq_length=16)
    check_layout(config, 1, 3)


def test_single_process_context_and_identity():
    assert not dist.is_initialized()
    assert build_parallel_context(1) == ParallelContext()
    with pytest.warns(UserWarning, match="no effect"):
        assert not build_parallel_context(1, sequence_parallel=True).sequence_parallel
    with pytest.raises(ValueError, match="needs several processes"):
        build_parallel_context(2)
    model = full_model()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    assert apply_tensor_parallel(model, ParallelContext()) is model
    assert not isinstance(model.lm_head, VocabParallelLMHead)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
