"""Embedding many images at the speed of the slowest stage: decode in threads, infer in batches.

Decoding a camera JPEG costs several times the INT8 model's own time, so a folder is
embedded fastest when decoding runs on every core and overlaps with inference. Pillow
releases the GIL while it decodes and resizes, and onnxruntime while it runs, so threads
suffice (no process pool, no pickling of arrays). A bounded window of decode jobs keeps
memory flat for any folder size; results come back in input order.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .preprocess import ImageError

T = TypeVar("T")
Out = TypeVar("Out")


#: Decode workers for every pipeline in the process (``cmn-edge --decode-workers N``).
DECODE_WORKERS_ENV = "CMN_EDGE_DECODE_WORKERS"


@dataclass(frozen=True)
class ThreadBudget:
    """How the cores are shared: onnxruntime's intra-op threads and the decode workers."""

    inference: int
    decode: int

    @classmethod
    def for_machine(
        cls, threads: int | None = None, decode_workers: int | None = None
    ) -> ThreadBudget:
        """Defaults: the model gets every core (it runs in bursts, between which its threads
        sleep), and so do the decoders: on 2 cores this measured best (end to end 92% of
        the model's own throughput on 2,000 photos). Overridable: ``--threads``, and
        ``--decode-workers`` or ``CMN_EDGE_DECODE_WORKERS``."""
        cores = os.cpu_count() or 1
        from_env = os.environ.get(DECODE_WORKERS_ENV, "")
        if decode_workers is None and from_env.strip():
            try:
                decode_workers = max(1, int(from_env))
            except ValueError:
                raise ValueError(f"{DECODE_WORKERS_ENV}={from_env!r} is not a number") from None
        return cls(inference=threads or cores, decode=decode_workers or cores)


def stream_batches(
    items: Iterable[T],
    load: Callable[[T], np.ndarray],
    infer: Callable[[np.ndarray], Out],
    batch_size: int = 32,
    workers: int = 2,
    skip_errors: bool = False,
    errors: list[tuple[T, str]] | None = None,
    prefetch_batches: int = 2,
) -> Iterator[tuple[list[T], Out]]:
    """(items, outputs) per batch, in input order (items: paths, PIL images or arrays).

    ``load`` runs in ``workers`` threads, ``prefetch_batches + 1`` batches ahead of ``infer``,
    which runs in the calling thread: at most ``prefetch_batches + 2`` batches of decoded
    images are held at once. An unreadable file (``ImageError``) stops
    the stream, or with ``skip_errors`` is left out and recorded in ``errors``.
    """
    window = max(1, batch_size) * (prefetch_batches + 1)
    pending: deque[tuple[T, Future]] = deque()
    source = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cmn-decode") as pool:

        def fill() -> None:
            for item in itertools.islice(source, window - len(pending)):
                pending.append((item, pool.submit(load, item)))

        try:
            fill()
            while pending:
                kept, arrays = [], []
                while pending and len(arrays) < batch_size:
                    item, future = pending.popleft()
                    try:
                        arrays.append(future.result())
                        kept.append(item)
                    except ImageError as exc:
                        if not skip_errors:
                            raise
                        if errors is not None:
                            errors.append((item, str(exc)))
                    fill()
                if arrays:
                    yield kept, infer(np.stack(arrays))
        finally:
            for _, future in pending:
                future.cancel()


__all__ = ["DECODE_WORKERS_ENV", "ThreadBudget", "stream_batches"]
