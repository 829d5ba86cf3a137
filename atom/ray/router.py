"""Which replica gets a request: least outstanding requests, sticky by request_id prefix.

Pure bookkeeping (no Ray): the pool asks `pick` for a replica, reports `started` / `finished`
around each request, and tells the router which replicas may serve (`healthy`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable


def sticky_key(request_id: str | None, separator: str) -> str | None:
    """The part of request_id before the first separator ("conv7:turn2" -> "conv7"); None: no id."""
    if request_id is None:
        return None
    return request_id.split(separator, 1)[0]


class Router:
    """Least-outstanding-requests routing with sticky keys.

    A request with a sticky key goes where the key went last, while that replica is healthy
    (its prefix cache holds the conversation); otherwise, and for requests without a key, to the
    healthy replica with the fewest outstanding requests (ties: the lowest id), and the key is
    bound there. At most `capacity` keys are remembered (least recently used forgotten).
    """

    def __init__(self, replica_ids: Iterable[int], separator: str = ":", capacity: int = 100_000) -> None:
        self.outstanding: dict[int, int] = {r: 0 for r in replica_ids}
        self.healthy: set[int] = set(self.outstanding)
        self.separator, self.capacity = separator, capacity
        self._sticky: OrderedDict[str, int] = OrderedDict()

    def set_healthy(self, replica_id: int, healthy: bool) -> None:
        self.outstanding.setdefault(replica_id, 0)
        (self.healthy.add if healthy else self.healthy.discard)(replica_id)

    def pick(self, request_id: str | None = None, exclude: Iterable[int] = ()) -> int | None:
        """The replica for this request (None: no healthy replica outside `exclude`)."""
        allowed = self.healthy - set(exclude)
        if not allowed:
            return None
        key = sticky_key(request_id, self.separator)
        if key is not None and self._sticky.get(key) in allowed:
            self._sticky.move_to_end(key)
            return self._sticky[key]
        choice = min(allowed, key=lambda r: (self.outstanding[r], r))
        if key is not None:
            self._sticky[key] = choice
            self._sticky.move_to_end(key)
            while len(self._sticky) > self.capacity:
                self._sticky.popitem(last=False)
        return choice

    def started(self, replica_id: int, count: int = 1) -> None:
        self.outstanding[replica_id] = self.outstanding.get(replica_id, 0) + count

    def finished(self, replica_id: int, count: int = 1) -> None:
        self.outstanding[replica_id] = max(0, self.outstanding.get(replica_id, 0) - count)

    def bound_to(self, request_id: str) -> int | None:
        """The replica a request_id's sticky key is bound to (None: not bound)."""
        return self._sticky.get(sticky_key(request_id, self.separator))
