"""A read cache in front of a Faust table, safe because this worker is the only writer of its partitions.

Every write still goes to the table (RocksDB and the changelog); reads of keys this process wrote or read
since the last rebalance are answered from memory, skipping Faust's key lookup, partition routing and the
RocksDB get. On any rebalance the whole cache is dropped: partitions may move, and a partition that comes
back may have been changed by another worker meanwhile.
"""

from __future__ import annotations

from collections.abc import MutableMapping


class TableCache:
    """Write-through, cleared on rebalance; bounded by dropping everything at `max_keys` (cheap, rare)."""

    def __init__(self, table: MutableMapping, max_keys: int = 200_000) -> None:
        self.table = table
        self.max_keys = max_keys
        self._data: dict[bytes, bytes | None] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> bytes | None:
        try:
            value = self._data[key]
            self.hits += 1
            return value
        except KeyError:
            self.misses += 1
            value = self.table.get(key)
            self._remember(key, value)
            return value

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.table[key] = value
        self._remember(key, value)

    def _remember(self, key: bytes, value: bytes | None) -> None:
        if not self.max_keys:
            return
        if len(self._data) >= self.max_keys:
            self._data.clear()
        self._data[key] = value

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
