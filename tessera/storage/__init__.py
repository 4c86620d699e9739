"""Storage the three services share: engines, migrations, transactions, UTC times.

Server-side only, like ``tessera.server``: the client wheel ships ``tessera`` without
``tessera.storage`` and ``tessera.server``. ``engine`` builds engines and runs
migrations, ``sqlite_connection`` is the connection the embedded SQLite default runs on,
and ``errors`` tells a database that cannot serve now from any other failure.
"""

from tessera.storage.engine import (
    TransactionalStore,
    UTCDateTime,
    create_engine,
    first_row,
    migrate,
    sqlite_url,
)

__all__ = [
    "TransactionalStore",
    "UTCDateTime",
    "create_engine",
    "first_row",
    "migrate",
    "sqlite_url",
]
