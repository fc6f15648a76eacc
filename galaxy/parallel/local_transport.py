"""In-process transport: ranks are threads of one process, messages are queue entries.

Used to run and test every parallel path with N devices and no network. A failure on any rank
aborts the group so the others stop waiting at once instead of running into their timeouts.
"""

from __future__ import annotations

import queue
import threading
import time

import torch

from ..errors import TransportError


class LocalGroup:
    """The shared mailboxes of `world` in-process ranks."""

    def __init__(self, world: int, timeout: float = 120.0):
        self.world, self.timeout = world, timeout
        self.boxes = {(s, d): queue.Queue() for s in range(world) for d in range(world)}
        self.aborted = threading.Event()

    def transport(self, rank: int) -> LocalTransport:
        return LocalTransport(self, rank)

    def abort(self) -> None:
        self.aborted.set()


class LocalTransport:
    def __init__(self, group: LocalGroup, rank: int):
        self.group, self.rank, self.world = group, rank, group.world

    def send(self, dst: int, tensor: torch.Tensor, tag: str = "") -> None:
        self.group.boxes[(self.rank, dst)].put(tensor)

    def recv(self, src: int, shape, dtype) -> torch.Tensor:
        box = self.group.boxes[(src, self.rank)]
        deadline = time.monotonic() + self.group.timeout
        while True:
            if self.group.aborted.is_set():
                raise TransportError(f"rank {self.rank}: group aborted while waiting for rank {src}")
            try:
                x = box.get(timeout=0.05)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TransportError(
                        f"rank {self.rank}: nothing from rank {src} within {self.group.timeout:.0f} s"
                    ) from None
        if tuple(x.shape) != tuple(shape) or x.dtype != dtype:
            raise TransportError(
                f"rank {self.rank}: from rank {src} got {tuple(x.shape)} {x.dtype}, "
                f"expected {tuple(shape)} {dtype}"
            )
        return x
