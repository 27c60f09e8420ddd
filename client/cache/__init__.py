"""A tiered cache over borrowed memory (:class:`TieredCache`): objects with an
authoritative source, served from the fastest tier that holds them, and never wrong.

Modules: :mod:`client.cache.tiered` (the cache), :mod:`client.cache.entry` (what it holds
and counts), :mod:`client.cache.fetch` (reads in flight), :mod:`client.cache.slabs`
(borrowed memory carved into slots).
"""

from client.cache.entry import CacheStats, Entry, Tier
from client.cache.tiered import TieredCache

__all__ = ["CacheStats", "Entry", "Tier", "TieredCache"]
