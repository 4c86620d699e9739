"""The Administrator's rules: the journal of operations and how each completes."""
