"""What the tests share, by what each module holds.

- ``tokens``: the bearer token of each role every test site is configured with.
- ``databases``, ``clock``: fresh SQLite/PostgreSQL databases; a clock moved by hand.
- ``in_process_site``: all three services in the test's event loop (``Site``).
- ``processes``: services as real processes (``python -m services.<name>``).
- ``real_site``: a whole site as real processes, driven with synchronous gRPC, for attacks.
- ``vendor``: the vendor's Activation Server alone, and a host identity that signs requests.
- ``trust``: a License Server alone with a vendor key in the test's hands.
- ``activating_vendor``: an in-process vendor and Administrator for License Server processes.
- ``lease_stream``, ``license_pools``: the Lease stream by hand; pools seeded in the store.
- ``bad_input``, ``snapshots``: bad input and its refusal; what the services hold, to compare.

Fixtures built on these are in tests/conftest.py (and a folder's own conftest.py).
"""
