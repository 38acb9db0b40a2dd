"""Forward (intercepting) mode: programs that reach their APIs through `HTTPS_PROXY`."""
