"""The state database: the activity log and audit trail (schema, the writer thread,
queries), the OAuth2 token cache and the registry of live gateways."""
