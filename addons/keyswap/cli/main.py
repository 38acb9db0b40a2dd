"""The `keyswap` command line: the root group and its commands, one module per group,
each a thin click layer over the library."""

from __future__ import annotations

import click

from keyswap.cli import (
    async_requests,
    ca,
    clients,
    config,
    dashboard,
    db,
    gateways,
    log,
    proxies,
    run,
    serve,
    templates,
    upstreams,
)
from keyswap.cli.options import Commands


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="keyswap")
def main() -> None:
    """keyswap: a credential-swapping API gateway built from mitmproxy addons.

    \b
    Example:
      keyswap check --config config/demo.yaml
    """


for command in (
    config.check,
    config.schema,
    serve.serve,
    upstreams.test_upstream,
    upstreams.upstreams,
    log.logs,
    log.stats,
    log.curl,
    log.audit,
    dashboard.dashboard,
    gateways.gateways,
    async_requests.async_requests,
    run.run,
    ca.ca,
    db.db,
    proxies.proxies,
    templates.templates,
    clients.test_proxy,
    clients.code,
    clients.export,
):
    main.add_command(command)
