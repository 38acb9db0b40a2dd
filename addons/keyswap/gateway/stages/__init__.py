"""The pipeline's stages, one module each, in the order `assembly.py` runs them: routing,
health, cors, auth, policy, rewrite, headers, swap, upstream, streaming, oauth2,
failures, tls, recorder."""
