"""Whole training runs at every parallel layout equal the single-process run, step by step, and checkpoints move
between layouts: examples/pretrain_phi1.py started by torchrun (one and two "nodes") and mpiexec, gloo on CPUs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megaphi.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "examples" / "pretrain_phi1.py")
BIN = Path(sys.executable).parent
ITERS = 10
RTOL = 1e-5
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE",
               "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**clean, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def flags(data: str, save: Path, *extra: str) -> list[str]:
    """A 10-step fp32 run without dropout of the tiny preset split into 4 heads, 2 micro-batches per DP rank."""
    return ["--preset", "tiny", "--num-attention-heads", "4", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--data-path", data, "--split", "100,0,0", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", str(ITERS), "--lr-warmup-iters", "2", "--no-bf16",
            "--eval-iters", "0", "--log-interval", "1", "--save", str(save), "--save-interval", "5", *extra]


def check_run(procs: list[subprocess.Popen]) -> None:
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{' '.join(proc.args)}\n{out[-3000:]}\n{err[-3000:]}"
    finally:
        for proc in procs:
            proc.kill()


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(launcher: str, nproc: int, args: list[str]) -> None:
    """Runs examples/pretrain_phi1.py with args: python (1), torchrun, torchrun over 2 nodes, or mpiexec."""
    if launcher == "python":
        procs = [start([sys.executable, SCRIPT, *args])]
    elif launcher == "torchrun":
        procs = [start([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), SCRIPT, *args])]
    elif launcher == "two-nodes":
        endpoint = f"127.0.0.1:{free_port()}"
        procs = [start([str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
                        str(nproc // 2), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "eq",
                        SCRIPT, *args]) for node in range(2)]
    else:
        procs = [start([str(BIN / "mpiexec"), "-n", str(nproc), sys.executable, SCRIPT, *args])]
    check_run(procs)


def losses(save: Path) -> dict[int, float]:
    """The per-iteration training losses that rank 0 logged to metrics.jsonl."""
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["iteration"]: r["loss"] for r in records if r.get("type") == "train"}


def assert_close(got: dict[int, float], want: dict[int, float], iterations) -> None:
    assert sorted(got) == list(iterations)
    for i in iterations:
        assert got[i] == pytest.approx(want[i], rel=RTOL, abs=0), (i, got[i], want[i])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    import numpy as np

    from megaphi.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefix = tmp_path_factory.mktemp("data") / "tokens"
    with IndexedDatasetBuilder(prefix, dtype=np.uint16) as builder:
        for _ in range(150):
            builder.add_document([rng.integers(0, 500, size=int(rng.integers(8, 60)))])
    return str(prefix)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    save = tmp_path_factory.mktemp("single")
    run("python", 1, flags(data, save))
    found = losses(save)
    assert sorted(found) == list(range(1, ITERS + 1)) and len(set(found.values())) > 1
    return save, found


LAYOUTS = {
    "tp2": ("torchrun", 2, ["--tensor-model-parallel-size", "2"]),
    "tp4": ("torchrun", 4, ["--tensor-model-parallel-size", "4"]),
    "dp2": ("torchrun", 2, []),
    "dp2-distributed-optimizer": ("torchrun", 2, ["--use-distributed-optimizer"]),
    "tp2xdp2": ("torchrun", 4, ["--tensor-model-parallel-size", "2"]),
    "tp2-sequence-parallel": ("torchrun", 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "two-nodes-tp2xdp2-sp-zero": ("two-nodes", 4, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                                   "--use-distributed-optimizer"]),
    "mpiexec-tp2": ("mpiexec", 2, ["--tensor-model-parallel-size", "2"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_process(name, data, reference, tmp_path):
    launcher, nproc, extra = LAYOUTS[name]
    run(launcher, nproc, flags(data, tmp_path, *extra))
    assert_close(losses(tmp_path), reference[1], range(1, ITERS + 1))
    meta = ckpt.read_meta(ckpt.find_checkpoint(tmp_path))
    tp = int(extra[extra.index("--tensor-model-parallel-size") + 1]) if "--tensor-model-parallel-size" in extra else 1
    assert meta["layout"]["tensor_parallel"] == tp and meta["layout"]["data_parallel"] == nproc // tp
    # The weights at the end equal the single-process run's, whatever the layout they were saved at.
    _, mine = ckpt.load_full_state_dict(tmp_path)
    _, single = ckpt.load_full_state_dict(reference[0])
    for key, tensor in single.items():
        assert mine[key].shape == tensor.shape
        assert (mine[key] - tensor).abs().max() <= 1e-4 * (1 + tensor.abs().max()), key


def test_checkpoints_move_between_tensor_parallel_sizes(data, reference, tmp_path):
    """TP 2 -> 1 -> 4: saved at iteration 5 with TP 2, continued to 7 with TP 1, then to 10 with TP 4."""
    tp2, tp1, tp4 = tmp_path / "tp2", tmp_path / "tp1", tmp_path / "tp4"
    run("torchrun", 2, flags(data, tp2, "--tensor-model-parallel-size", "2", "--exit-interval", "5"))
    run("python", 1, flags(data, tp1, "--load", str(tp2), "--exit-interval", "7"))
    run("torchrun", 4, flags(data, tp4, "--load", str(tp1), "--tensor-model-parallel-size", "4"))
    want = reference[1]
    assert_close(losses(tp2), want, range(1, 6))
    assert_close(losses(tp1), want, range(6, 8))
    assert_close(losses(tp4), want, range(8, ITERS + 1))


def test_checkpoints_move_between_data_parallel_sizes_and_optimizers(data, reference, tmp_path):
    """DP 2 with the distributed optimizer -> one process -> DP 2 without it, Adam states included."""
    zero, single, dp2 = tmp_path / "zero", tmp_path / "single", tmp_path / "dp2"
    run("torchrun", 2, flags(data, zero, "--use-distributed-optimizer", "--exit-interval", "4"))
    run("python", 1, flags(data, single, "--load", str(zero), "--exit-interval", "7"))
    run("torchrun", 2, flags(data, dp2, "--load", str(single)))
    want = reference[1]
    assert_close(losses(zero), want, range(1, 5))
    assert_close(losses(single), want, range(5, 8))
    assert_close(losses(dp2), want, range(8, ITERS + 1))
