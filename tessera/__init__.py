"""Tessera's shared package: the generated contracts (``tessera.<service>.v1``) and the few
primitives that cross service boundaries: signed envelopes, keys and host identity,
readable IDs, License Server addresses, error translation, storage and serving plumbing.

No service imports another service's package; they meet here and in ``protos/``.
"""
