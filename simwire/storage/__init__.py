"""Storage adapters. `open_store` is called by the composition root (simwire.app) only."""

from __future__ import annotations

from pathlib import Path

from simwire.ports import Store


async def open_store(url: str, data_dir: Path, sqlite_synchronous: str = "FULL") -> Store:
    """`sqlite` (embedded, file in `data_dir`) or a `mongodb://` / `mongodb+srv://` URL."""
    if url == "sqlite":
        from simwire.storage.sqlite import SqliteStore

        return await SqliteStore(data_dir / "simwire.db", sqlite_synchronous).open()
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from simwire.storage.mongodb import MongoStore

        return await MongoStore(url).open()
    raise ValueError(f"unknown store {url!r}: use 'sqlite' or a mongodb:// URL")
