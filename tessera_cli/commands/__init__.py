"""The calls behind each subcommand, grouped by what they talk to: ``online`` and
``journal`` (the Administrator), ``offline`` (request and response files), ``site`` (the
License Server), ``vendor`` (the Activation Server), ``config`` (the settings); ``lookup``
finds what a typed id or feature names. Each area but ``lookup`` declares its subcommands,
their arguments and help in its ``register(commands)``, which ``parser.build`` calls."""
