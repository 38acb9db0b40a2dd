"""Wire-level helpers that know nothing of keyswap's config: raw header fields and how
URLs, authorities and query parameters are written."""
