"""The License Server's storage: tables, repository, migrations."""
