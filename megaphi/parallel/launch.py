"""Starting torch.distributed from whatever launched the processes: torchrun, mpiexec/srun with MPI, or SLURM.

init_distributed() looks, in this order, for
  1. torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
  2. an MPI launch (mpiexec/mpirun of MPICH, Open MPI, Intel MPI, MVAPICH, or srun with a PMI/PMIx plugin):
     mpi4py gives rank and size, the local rank comes from a shared-memory split of COMM_WORLD, and rank 0
     picks the master address and a free port (or takes MASTER_ADDR/MASTER_PORT) and broadcasts them;
  3. a SLURM job step (srun without MPI): SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS),
     SLURM_LOCALID; the master is the first host of the step's node list, the port MASTER_PORT or one derived
     from SLURM_JOB_ID (so every task computes the same one without talking);
  4. otherwise one process: nothing is initialised.
It then exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (so later code sees one convention) and calls
init_process_group: NCCL with this process's GPU when CUDA is available, else gloo.
"""

import os
import re
import socket
from datetime import timedelta
from itertools import product

import torch
import torch.distributed as dist

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "MPI_LOCALRANKID")
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ('node[01-03,07],gpu-a[1-2]-ib') as host names, in order."""
    hosts = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip()):
        parts = re.split(r"\[([^\]]*)\]", item)  # text, range, text, range, ..., text
        choices = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                choices.append([part])
                continue
            values = []
            for spec in part.split(","):
                match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", spec)
                if not match:
                    raise ValueError(f"SLURM node list {nodelist!r}: cannot read the range [{part}]")
                lo, hi = match.group(1), match.group(2) or match.group(1)
                if int(hi) < int(lo):
                    raise ValueError(f"SLURM node list {nodelist!r}: range {spec} runs backwards")
                values += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
            choices.append(values)
        hosts += ["".join(combo) for combo in product(*choices)]
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def slurm_port(job_id: int) -> int:
    """The rendezvous port every task of a SLURM job derives from its id: 20000 + job_id mod 20000."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _free_port() -> int:
    """A TCP port that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _from_torchrun() -> tuple[int, int, int, str | None, int | None]:
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK", 0)
    return rank, world, local, os.environ.get("MASTER_ADDR"), _env_int("MASTER_PORT")


def _mpi_launch_detected() -> bool:
    return any(os.environ.get(name) for name in MPI_RANK_VARS + MPI_SIZE_VARS)


def _slurm_step_detected() -> bool:
    # SLURM_STEP_ID is set by srun, not in the batch script itself: a python started there directly is one process.
    return "SLURM_PROCID" in os.environ and bool(os.environ.get("SLURM_STEP_ID") or os.environ.get("SLURM_STEPID"))


def _launcher_world_size() -> tuple[str, int] | None:
    """(variable, value) of the process count the MPI launcher (or srun) announced, when it announced one."""
    names = MPI_SIZE_VARS + (("SLURM_STEP_NUM_TASKS",) if _slurm_step_detected() else ())
    return next(((n, _env_int(n)) for n in names if os.environ.get(n)), None)


def _from_mpi() -> tuple[int, int, int, str, int]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    announced = _launcher_world_size()
    # An mpi4py built against another MPI than the launcher's starts every process as a world of its own: they would
    # all train alone (and write the same checkpoints) instead of together.
    if announced is not None and announced[1] != world:
        raise ValueError(f"the launcher started {announced[1]} processes ({announced[0]}={announced[1]}) but "
                         f"mpi4py's MPI ({MPI.Get_library_version().splitlines()[0].strip()}) sees a world of "
                         f"{world}: mpi4py is built against another MPI than the launcher's. Use that MPI's "
                         f"mpiexec, rebuild mpi4py against it (pip install --no-binary mpi4py mpi4py), or launch "
                         f"with torchrun")
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    master = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if local_size == world else socket.gethostname())
        port = _env_int("MASTER_PORT") or _free_port()
        master = (addr, port)
    addr, port = comm.bcast(master, root=0)
    return rank, world, local, addr, port


def _from_slurm() -> tuple[int, int, int, str, int]:
    rank = _env_int("SLURM_PROCID")
    world = _env_int("SLURM_STEP_NUM_TASKS") or _env_int("SLURM_NTASKS")
    if world is None:
        raise ValueError("SLURM job step without SLURM_STEP_NUM_TASKS or SLURM_NTASKS: start it with srun "
                         "--ntasks-per-node N (one task per GPU)")
    local = _env_int("SLURM_LOCALID", 0)
    nodes = next((os.environ[n] for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                  if os.environ.get(n)), None)
    addr = os.environ.get("MASTER_ADDR") or (expand_nodelist(nodes)[0] if nodes else None)
    if addr is None:
        raise ValueError("SLURM job step without SLURM_JOB_NODELIST: set MASTER_ADDR to the first node's host name")
    port = _env_int("MASTER_PORT")
    if port is None:
        job_id = _env_int("SLURM_JOB_ID")
        if job_id is None:
            raise ValueError("SLURM job step without SLURM_JOB_ID: set MASTER_PORT to a free port on the first node")
        port = slurm_port(job_id)
    return rank, world, local, addr, port


def detect_launch() -> tuple[str, int, int, int, str | None, int | None]:
    """(launcher, rank, world_size, local_rank, master_addr, master_port) of this process; MPI is initialised."""
    if os.environ.get("RANK", "") != "" and os.environ.get("WORLD_SIZE", "") != "":
        return ("torchrun", *_from_torchrun())
    if _mpi_launch_detected():
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            if _slurm_step_detected():  # srun --mpi=pmix without mpi4py: SLURM's own variables do the job
                return ("slurm", *_from_slurm())
            found = [n for n in MPI_RANK_VARS if os.environ.get(n)] or ["PMI_SIZE/OMPI_COMM_WORLD_SIZE"]
            raise ValueError(f"an MPI launch was detected ({found[0]} is set) but mpi4py is not installed: "
                             f"pip install megaphi[mpi] (or start the processes with torchrun)") from None
        return ("mpi", *_from_mpi())
    if _slurm_step_detected():
        return ("slurm", *_from_slurm())
    return "single", 0, 1, 0, None, None


def default_backend() -> str:
    """nccl when CUDA GPUs are visible, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_minutes: float = 10.0) -> tuple[int, int, int]:
    """Initialises the default process group from the launcher's environment; (rank, world_size, local_rank).

    One process (nothing launched it in parallel) initialises nothing and returns (0, 1, 0).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0)
    launcher, rank, world, local, addr, port = detect_launch()
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"{launcher} launch: rank {rank} outside world size {world}")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    if world == 1:
        return 0, 1, local
    if addr is None or port is None:
        raise ValueError(f"{launcher} launch with WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT unset: set both to "
                         f"the rank-0 host and a free port (torchrun sets them)")
    os.environ.update(MASTER_ADDR=str(addr), MASTER_PORT=str(port))
    backend = backend or default_backend()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"--distributed-backend must be nccl or gloo, not {backend!r}")
    device_id = None
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("--distributed-backend nccl needs CUDA GPUs: none is visible (use gloo on CPUs)")
        # local rank modulo the visible GPUs: one GPU per task (srun --gpus-per-task) shows each task only its own
        device_id = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device_id)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(minutes=timeout_minutes), device_id=device_id)
    return rank, world, local


def destroy_distributed() -> None:
    """Tears the default process group down (nothing when none was initialised)."""
    if dist.is_initialized():
        dist.destroy_process_group()
