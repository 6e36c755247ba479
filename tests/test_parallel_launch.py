"""init_distributed under real launchers: torchrun (one and two "nodes"), mpiexec, SLURM variables; node lists."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from megaphi.parallel.launch import detect_launch, expand_nodelist, init_distributed, slurm_port

BIN = Path(sys.executable).parent
SCRIPT = """
import json, torch, torch.distributed as dist
from megaphi.parallel.launch import init_distributed, destroy_distributed
rank, world, local = init_distributed()
total = torch.tensor([float(rank)])
if world > 1:
    dist.all_reduce(total)
print(json.dumps({"rank": rank, "world": world, "local": local, "sum": total.item(),
                  "initialized": dist.is_initialized()}), flush=True)
destroy_distributed()
"""
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
               "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_RANK",
               "MV2_COMM_WORLD_SIZE", "MPI_LOCALRANKID",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_ID",
               "SLURM_STEPID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST")


def free_port(start: int = 0) -> int:
    """A free port: any (start 0), or the first one from start up."""
    for port in range(start, start + 1000) if start else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port from {start}")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "launch_check.py"
    path.write_text(SCRIPT)
    return str(path)


def results(*outputs) -> list[dict]:
    """The JSON lines of every process, sorted by rank (mpiexec may glue lines together)."""
    found = [json.loads(m) for out in outputs for m in re.findall(r"\{[^{}]*\}", out)]
    return sorted(found, key=lambda r: r["rank"])


def check(found, world, locals_):
    assert [r["rank"] for r in found] == list(range(world))
    assert all(r["world"] == world and r["sum"] == world * (world - 1) / 2 and r["initialized"] for r in found)
    assert [r["local"] for r in found] == locals_


def test_torchrun_one_node(script):
    run = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", script],
                         env=clean_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    check(results(run.stdout), 2, [0, 1])


def test_torchrun_two_nodes_through_the_rendezvous(script):
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
                               "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "launchtest",
                               script], env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in range(2)]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err
            outputs.append(out)
    finally:
        for proc in procs:
            proc.kill()
    found = results(*outputs)
    check(found, 4, [0, 1, 0, 1])
    for out in outputs:  # each "node" ran two consecutive ranks with local ranks 0 and 1
        ranks = results(out)
        assert [r["local"] for r in ranks] == [0, 1] and ranks[1]["rank"] == ranks[0]["rank"] + 1


def test_mpiexec(script):
    run = subprocess.run([str(BIN / "mpiexec"), "-n", "2", sys.executable, script], env=clean_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    check(results(run.stdout), 2, [0, 1])


def test_slurm_variables(script):
    port = free_port(20000 + os.getpid() % 19000)
    job_id = 5_000_000 + port - 20000  # the tasks derive their port from the job id
    assert slurm_port(job_id) == port
    procs = [subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
                                            SLURM_LOCALID=str(r), SLURM_STEP_ID="0", SLURM_JOB_ID=str(job_id),
                                            SLURM_JOB_NODELIST="localhost,fakenode[02-03]"))
             for r in range(2)]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            outputs.append(out)
    finally:
        for proc in procs:
            proc.kill()
    check(results(*outputs), 2, [0, 1])


def test_single_process_initialises_nothing(script):
    run = subprocess.run([sys.executable, script], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert results(run.stdout) == [{"rank": 0, "world": 1, "local": 0, "sum": 0.0, "initialized": False}]


def test_mpi_launch_without_mpi4py_says_what_to_install(script, tmp_path):
    shadow = tmp_path / "shadow" / "mpi4py"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('mpi4py hidden for this test')\n")
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60,
                         env=clean_env(PMI_RANK="0", PMI_SIZE="2", PYTHONPATH=str(tmp_path / "shadow")))
    assert run.returncode != 0
    assert "MPI launch was detected (PMI_RANK is set)" in run.stderr and "pip install megaphi[mpi]" in run.stderr


def test_mpi4py_of_another_mpi_is_refused(script):
    """A launcher's variables (here MVAPICH's) that mpi4py's MPI ignores: each process would be a world of one."""
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60,
                         env=clean_env(MV2_COMM_WORLD_RANK="0", MV2_COMM_WORLD_SIZE="2"))
    assert run.returncode != 0, run.stdout
    assert "the launcher started 2 processes (MV2_COMM_WORLD_SIZE=2) but mpi4py's MPI" in run.stderr, run.stderr


def set_env(monkeypatch, **values):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_detection_from_variables(monkeypatch):
    set_env(monkeypatch, SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_JOB_ID="7")
    assert detect_launch()[0] == "single"  # the batch script itself, outside srun
    set_env(monkeypatch, SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8", SLURM_LOCALID="1",
            SLURM_STEP_ID="0", SLURM_JOB_ID="123456", SLURM_STEP_NODELIST="gpu[007-008]")
    assert detect_launch() == ("slurm", 5, 8, 1, "gpu007", slurm_port(123456))
    monkeypatch.setenv("MASTER_PORT", "29555")
    assert detect_launch()[-1] == 29555
    set_env(monkeypatch, RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1234",
            SLURM_PROCID="0", SLURM_STEP_ID="0")  # torchrun inside srun: torchrun's variables win
    assert detect_launch() == ("torchrun", 3, 4, 1, "h", 1234)


def test_missing_master_and_bad_values_are_named(monkeypatch):
    set_env(monkeypatch, RANK="0", WORLD_SIZE="2")
    with pytest.raises(ValueError, match="MASTER_ADDR/MASTER_PORT unset"):
        init_distributed()
    assert not dist.is_initialized()
    set_env(monkeypatch, RANK="2", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="1")
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        init_distributed()
    set_env(monkeypatch, RANK="zero", WORLD_SIZE="2")
    with pytest.raises(ValueError, match="RANK='zero' is not an integer"):
        init_distributed()
    set_env(monkeypatch, RANK="0", WORLD_SIZE="1")
    assert init_distributed(backend="nccl") == (0, 1, 0) and not dist.is_initialized()


def test_expand_nodelist():
    assert expand_nodelist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert expand_nodelist("login1") == ["login1"]
    assert expand_nodelist("a1,b[2-3],c") == ["a1", "b2", "b3", "c"]
    assert expand_nodelist("gpu-[9-11]-ib") == ["gpu-9-ib", "gpu-10-ib", "gpu-11-ib"]
    assert expand_nodelist("r[1-2]-n[8-9]") == ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]
    assert expand_nodelist("n[098-101]") == ["n098", "n099", "n100", "n101"]
    for bad in ("n[3-1]", "n[a-b]", ""):
        with pytest.raises(ValueError, match="SLURM node list"):
            expand_nodelist(bad)
