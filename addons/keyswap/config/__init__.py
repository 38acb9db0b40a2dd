"""The configuration: the pydantic model of the YAML file, loading with `${...}`
substitution and cross-checks, comment-keeping edits, templates, proxy tokens, and the
one place where secrets are masked."""
