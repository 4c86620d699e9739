"""Which database failures mean "the database cannot serve now" rather than a bug.

A read-only or full disk, a database server that restarts, refuses connections or is out
of resources: the request did not happen, and the same request may succeed later. Such a
failure becomes UNAVAILABLE with the reason DATABASE_UNAVAILABLE, so clients retry and
operators read what to fix, instead of INTERNAL.
"""

from __future__ import annotations

from sqlalchemy import exc

# SQLite's messages for conditions outside the program (sqlite3 gives no codes before 3.11's
# sqlite_errorname, and aiosqlite wraps it anyway).
_SQLITE = {
    "database or disk is full": "the disk is full",
    "attempt to write a readonly database": "the database is read-only",
    "disk i/o error": "the disk failed",
    "unable to open database file": "the database file cannot be opened",
    "database is locked": "the database is locked by another writer",
    "readonly database": "the database is read-only",
}

# PostgreSQL SQLSTATE classes and codes (appendix A of its manual).
_SQLSTATE_CLASSES = {
    "08": "the connection to the database failed",
    "53": "the database server is out of resources (disk full, memory, connections)",
    "57": "the database server is shutting down or restarting",
    "58": "the database server had an I/O error",
}
_SQLSTATES = {
    "25006": "the database is read-only",
}


def database_unavailable(error: BaseException) -> str | None:
    """Why the database cannot serve now, in words, or None when ``error`` is not such a
    condition (a bug stays a bug)."""
    if isinstance(error, exc.TimeoutError):
        return "no database connection was free in time"
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return "the connection to the database was lost"
        sqlstate = getattr(error.orig, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate:
            if sqlstate in _SQLSTATES:
                return _SQLSTATES[sqlstate]
            if sqlstate[:2] in _SQLSTATE_CLASSES:
                return _SQLSTATE_CLASSES[sqlstate[:2]]
        if isinstance(error, exc.OperationalError | exc.InterfaceError):
            text = str(error.orig).lower()
            for message, why in _SQLITE.items():
                if message in text:
                    return why
            if "connection" in text and ("closed" in text or "refused" in text):
                return "the connection to the database was lost"
    elif isinstance(error, ConnectionError | OSError):
        # asyncpg connecting to a server that is down or restarting
        return f"the database cannot be reached ({type(error).__name__})"
    return None
