"""Cluster hashes: what verify and merge check images against, and a thread that computes
them beside a backup's copy.

A backup needs its hashes only once the image is complete (they are stored beside it),
so the copy does not wait for them: it queues each cluster it wrote and goes on reading.
hashlib lets go of the GIL while it hashes a cluster, so the hashing runs on another
core instead of between the copy's requests. The queue holds at most ``max_backlog``
bytes of clusters; past that the copy waits for the hasher.
"""

from __future__ import annotations

import hashlib
import queue
import threading

ZERO_HASH = "zero"  # the hash recorded for a zero cluster


def cluster_hash(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class BackgroundHasher:
    """Hashes queued clusters in a thread into ``out`` (cluster index -> hash)."""

    def __init__(
        self, out: dict[str, str], max_backlog: int = 64 * 1024 * 1024, start: bool = True
    ) -> None:
        self.out = out
        self.max_backlog = max_backlog
        self._queue: queue.SimpleQueue[tuple[str, memoryview] | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._backlog = 0
        self._thread = threading.Thread(target=self._run, name="backup-hasher", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self._thread.start()

    def submit(self, key: str, piece: memoryview) -> None:
        """Queue one cluster; ``piece`` must not change until it is hashed."""
        with self._cond:
            self._backlog += len(piece)
        self._queue.put((key, piece))

    @property
    def full(self) -> bool:
        return self._backlog >= self.max_backlog

    def wait_for_room(self) -> None:
        """Block (in a worker thread) until the backlog is below its bound."""
        with self._cond:
            while self._backlog >= self.max_backlog and self._thread.is_alive():
                self._cond.wait(1.0)

    def finish(self) -> None:
        """Block until every queued cluster is hashed, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            key, piece = item
            self.out[key] = cluster_hash(piece)
            with self._cond:
                self._backlog -= len(piece)
                self._cond.notify_all()
