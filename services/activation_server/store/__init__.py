"""The Activation Server's storage: tables, repository, migrations, vendor key files."""
