"""Storage adapters. `open_store` is called by the composition root (simwire.app) only."""

from __future__ import annotations

from pathlib import Path

from simwire.ports import Store


async def open_store(
    url: str, data_dir: Path, sqlite_synchronous: str = "FULL", retention_days: int = 7
) -> Store:
    """`sqlite` (embedded, file in `data_dir`) or a `mongodb://` / `mongodb+srv://` URL.

    `retention_days` also sets MongoDB's TTL index (SQLite relies on the purge task)."""
    if url == "sqlite":
        from simwire.storage.sqlite import SqliteStore

        return await SqliteStore(data_dir / "simwire.db", sqlite_synchronous).open()
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from simwire.storage.mongodb import MongoStore

        return await MongoStore(url, retention_days=retention_days).open()
    raise ValueError(f"unknown store {url!r}: use 'sqlite' or a mongodb:// URL")
