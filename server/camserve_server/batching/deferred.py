"""Items that come undecoded (``DeferredDecode``): the worker decodes them when it takes them,
before the batch runs, and an item whose decode fails answers its error alone.

Handlers send an item undecoded only while :meth:`Batcher.idle` (a worker waits, and the last
batches ran alone): a lone request then goes from the event loop to the worker and back,
instead of through the decode pool as well. Callers that send at the same moment must still
share a batch: handlers announce the items they are decoding in the pool
(:meth:`Batcher.arriving`), and a worker that has just decoded an item itself waits for those,
up to as long as its own decode took.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import List

from ..domain import DeferredDecode
from .queue import Pending, WorkQueue
from .tickets import resolve


def decode_deferred(queue: WorkQueue, batch: List[Pending],
                    taken: List[Pending]) -> List[Pending]:
    """Decode the batch's undecoded items here. When there were any and the batch has
    room, it takes the items that came meanwhile, and waits (as long as its own decodes
    took, at most) for those the handlers are still decoding: callers that sent together
    share a batch, as when the pool decodes them all. The items it takes join ``taken`` (the
    worker's, which a dying worker fails) before they are decoded."""
    if not any(isinstance(p.work.pixels, DeferredDecode) for p in batch):
        return batch
    started = time.monotonic()
    batch = [p for p in batch if decoded(queue, p)]
    now = time.monotonic()
    closes = now + (now - started)
    room = queue.max_batch_size - len(batch)
    if not batch or not room:
        return batch
    late = queue.take_arriving(room, closes)
    taken.extend(late)
    return batch + [p for p in late if queue.admit(p) and decoded(queue, p)]


def decoded(queue: WorkQueue, pending: Pending) -> bool:
    """Decode an admitted item that came undecoded (DeferredDecode), here on the worker;
    False when its decode failed (the item answers that error alone). Its time in the
    queue does not count the decode."""
    pixels = pending.work.pixels
    if not isinstance(pixels, DeferredDecode):
        return True
    started = time.monotonic()
    try:
        pending.work = replace(pending.work, pixels=pixels.decode())
    except Exception as exc:  # the image's ServiceError, or a bug: this item only
        queue.settle(pending)
        resolve(pending.future, exception=exc)
        return False
    pending.enqueued += time.monotonic() - started
    return True
