"""Load generator for the License Server: ``python -m bench`` (see docs/performance.md).

It measures, in one run, a bare grpc.aio echo server (the ceiling on this machine),
checkout+checkin cycles on SQLite and PostgreSQL, concurrent streaming leases (RSS and
CPU per lease) and a reconnect storm after SIGKILL, and prints figures, ratios and
PASS/FAIL beside the targets. It is a measurement, not a test: nothing here asserts.
"""
