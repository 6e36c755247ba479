"""Dropout randomness inside tensor-parallel regions: a per-TP-rank seed, forked around the region.

Outside TP regions activations are replicated over the TP ranks, so their dropout must draw the same masks on
every rank: it uses the default generators, seeded alike everywhere. Inside a TP region (attention on head
shards; with sequence parallelism also the sequence shards) each rank must draw different masks, so the region
runs under `tracker.fork(device)`, which swaps the device's default generator for one seeded from
(seed + 2718 + tp_rank, as Megatron) and swaps it back afterwards.

Unlike Megatron, the forked generator is not a long-lived state: each fork seeds it from the per-rank seed mixed
with one number drawn from the default CPU generator. So the masks are a function of the default generators,
which activation recomputation (torch.utils.checkpoint, preserve_rng_state) restores before replaying a block and
which checkpoints save (train/checkpoint.py rng.pt): recomputed and resumed runs draw the same masks, with no
extra state to carry. get_state()/set_state() hold only the seed, independent of the layout.
"""

import contextlib

import torch

TP_SEED_OFFSET = 2718  # Megatron's offset of the model-parallel seed from --seed
_MASK64 = (1 << 64) - 1


def _mix(a: int, b: int) -> int:
    """A 63-bit seed from two integers (splitmix64's finalizer): distinct a give distinct seeds for the same b."""
    x = (a * 0x9E3779B97F4A7C15 + b) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


class TensorParallelRNG:
    """The RNG used for dropout inside TP regions; one per process (see get_tracker())."""

    def __init__(self):
        self.seed: int | None = None
        self.tp_rank = 0

    def set_seed(self, seed: int, tp_rank: int) -> None:
        """Seeds this rank's stream: --seed and the rank in its TP group."""
        self.seed, self.tp_rank = int(seed), int(tp_rank)

    def get_state(self) -> dict:
        """What a checkpoint saves: the seed (the rank comes from the layout at load time)."""
        return {"seed": self.seed}

    def set_state(self, state: dict) -> None:
        """Restores get_state()'s output, keeping this process's TP rank."""
        self.seed = state["seed"]

    @contextlib.contextmanager
    def fork(self, device):
        """Within the block, random ops on device (cpu or cuda) draw from this TP rank's generator."""
        if self.seed is None:
            raise RuntimeError("dropout in a tensor-parallel region needs the TP RNG seeded: call "
                               "megaphi.parallel.random.get_tracker().set_seed(seed, ctx.tp_rank) after "
                               "build_parallel_context")
        device = torch.device(device)
        # From the default CPU generator on every device: recomputation and checkpoints restore it, and a CPU
        # draw does not synchronise with a GPU.
        draw = int(torch.randint(0, 1 << 62, (1,)))
        seed = _mix(self.seed + TP_SEED_OFFSET + self.tp_rank, draw)
        if device.type == "cpu":
            saved = torch.get_rng_state()
            torch.default_generator.manual_seed(seed)
            restore = lambda: torch.set_rng_state(saved)  # noqa: E731
        elif device.type == "cuda":
            index = torch.cuda.current_device() if device.index is None else device.index
            saved = torch.cuda.get_rng_state(index)
            torch.cuda.default_generators[index].manual_seed(seed)
            restore = lambda: torch.cuda.set_rng_state(saved, index)  # noqa: E731
        else:
            raise ValueError(f"TensorParallelRNG.fork supports cpu and cuda devices, got {device}")
        try:
            yield
        finally:
            restore()


_TRACKER = TensorParallelRNG()


def get_tracker() -> TensorParallelRNG:
    """This process's TP RNG."""
    return _TRACKER
