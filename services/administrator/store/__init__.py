"""The Administrator's storage: the operations journal and its migrations."""
