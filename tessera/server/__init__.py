"""The server framework the three services share: serving (``serving``), the handler
wrappers every call goes through (``handlers``, ``error_table``, ``auth``,
``call_observer``, ``deadlines``), TLS for ports (``tls``), metrics, logs, settings
(``config``), limits and crash-test failpoints.

Server-side only: the client wheel ships ``tessera`` without ``tessera.server`` and
``tessera.storage``, and nothing in ``clients/`` imports them (tests/test_layers.py).
"""
