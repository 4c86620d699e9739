"""``tessera``: the operator's and vendor staff's command line for Tessera.

What EcoStruxure's License Administrator and FlexNet's ``lmutil`` do, over the Tessera
gRPC contracts: look an order up, activate, return, repair and move licenses (online or by
file), show License Information, who holds which seat, trusted storage's health and the
operations journal; and for vendor staff, entitlements, activations, the audit log,
forced returns and signing keys.

Layers: ``parser`` (the ``tessera`` parser) -> ``commands`` (per area, its subcommands'
arguments and help in ``register`` next to the gRPC calls they run, built with
``arguments``) -> ``views`` (human tables) and ``records`` (``--json``); ``settings`` says
where the services are, ``failures`` turns a refusal into what went wrong and what to do,
with an exit code. ``app.main`` is the console script.
"""
