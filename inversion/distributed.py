"""Distributed training and Ctrl-C: torchrun's process group, and a stop that every rank takes at the same step.

`init_distributed` turns torchrun's environment into a process group (NCCL on CUDA, gloo on CPU) and this rank's
device; one process without torchrun is a world of one. `GracefulStop` makes the first Ctrl-C finish the current
step and save, and a second one quit at once.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ldm import cli


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun's env → a process group (NCCL on CUDA, gloo on CPU) and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), cli.pick_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = cli.pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when `flag` is true on any of them (a world of one: the flag itself)."""
    if d.world <= 1:
        return flag
    value = torch.tensor(float(flag), device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class GracefulStop:
    """First Ctrl-C (SIGINT): finish the current step, save and exit 0; a second Ctrl-C stops at once
    (KeyboardInterrupt, exit 130) with the files of the last save. Under DDP every rank stops at the same step."""

    def __init__(self, d: Dist) -> None:
        self.d, self._flag, self._previous = d, False, None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self._flag:
            raise KeyboardInterrupt
        self._flag = True
        os.write(2, b"\nCtrl-C: finishing this step and saving (press Ctrl-C again to quit without saving)\n")

    def requested(self) -> bool:
        return any_rank(self._flag, self.d)  # one rank's Ctrl-C stops them all, at the same step
