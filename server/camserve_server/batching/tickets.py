"""What a handler holds while its item waits: a ticket (a future) that resolves to the item's
outcome or its error."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Optional

from ..domain import ItemResult


@dataclass(frozen=True)
class Outcome:
    """What an item's ticket resolves to: the engine's result and where the time went."""

    result: ItemResult
    queue_ms: float
    compute_ms: float
    batch_size: int
    device: str


class Ticket(Future):
    """An item's future. ``withdraw`` drops the item from the queue if its batch has not
    started, and stops its job at the next slice if it has."""

    reason = "cancelled"  # why it was withdrawn, for the metrics: cancelled or skipped
    abandoned = False  # withdrawn while running: its job stops at the next slice

    def withdraw(self, reason: str = "cancelled") -> bool:
        """Drop the item before it costs compute; False if it already runs or ran."""
        if self.done():
            return False
        self.reason = reason
        if self.running():
            self.abandoned = True
            return False
        return self.cancel()


def resolve(future: Future, result=None, exception: Optional[BaseException] = None) -> None:
    """Answer the ticket, unless it is answered already."""
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
