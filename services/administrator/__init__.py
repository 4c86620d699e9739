"""The Administrator: the operator's broker for activation between License Server and vendor."""
