"""Short-lived storage for images returned as `url` (served by GET /v1/images/{id}/content).

In memory, bounded by count and age: a gateway replica keeps what it produced for
`ttl_s`; clients that want to keep an image download it."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict


class ImageStore:
    def __init__(self, max_items: int = 256, ttl_s: float = 3600.0):
        self.max_items, self.ttl_s = max_items, ttl_s
        self._items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes, mime_type: str) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._items[key] = (time.monotonic(), data, mime_type)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> tuple[bytes, str] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            created, data, mime = item
            if time.monotonic() - created > self.ttl_s:
                del self._items[key]
                return None
            return data, mime
