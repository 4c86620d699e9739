"""The three Tessera services; each is its own process: ``python -m services.<name>``."""
