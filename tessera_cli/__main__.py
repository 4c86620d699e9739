"""``python -m tessera_cli``: the same as the ``tessera`` console script."""

from tessera_cli.app import main

main()
