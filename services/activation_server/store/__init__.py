"""The Activation Server's storage: tables, repository, migrations."""
