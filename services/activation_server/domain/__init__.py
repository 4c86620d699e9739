"""The Activation Server's rules: entitlements, activation, return and repair decisions,
vendor signing keys and the audit log."""
