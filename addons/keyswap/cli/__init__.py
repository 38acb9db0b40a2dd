"""The `keyswap` command line: one module per command group, each a thin click layer
over the library."""
