"""The Activation Server's rules: entitlements, activation decisions, vendor signatures."""
