"""`keyswap ca`: keyswap's certificate authority for forward mode (a thin layer over
`keyswap.forward.ca`)."""

from __future__ import annotations

from pathlib import Path

import click

from keyswap.cli.options import config_option, json_option, print_json
from keyswap.forward import ca as authority

ca_dir_option = click.option(
    "--ca-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="keyswap's CA's folder [default: keyswap-ca/ beside the config file].",
)


def ca_or_fail(config_path: str, ca_dir: Path | None) -> authority.CA:
    """keyswap's CA for this config (made on first use), or exit 1 saying why not."""
    folder = authority.folder_for(Path(config_path), ca_dir)
    try:
        return authority.ensure(folder)
    except (OSError, ValueError) as e:
        raise click.ClickException(
            f"no usable CA in {folder}: {e} (name another folder with --ca-dir)"
        ) from e


@click.command("ca")
@config_option
@ca_dir_option
@click.option(
    "--export",
    "export_to",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the CA certificate (PEM, no key) to this file.",
)
@json_option
def ca(config_path: str, ca_dir: Path | None, export_to: Path | None, as_json: bool) -> None:
    """Show keyswap's CA: the path of its certificate and its SHA-256 fingerprint (the
    CA is made on first use). Programs that go through forward mode trust this
    certificate; its private key stays in the folder, readable by its owner only.

    \b
    Example:
      keyswap ca --config config/keyswap.yaml --export keyswap-ca.pem
    """
    found = ca_or_fail(config_path, ca_dir)
    if export_to is not None:
        export_to.write_bytes(found.pem)
    if as_json:
        print_json(
            {
                "path": str(found.cert_path),
                "sha256": found.sha256,
                "created": found.created,
                "exported": str(export_to) if export_to else None,
            }
        )
        return
    click.echo(f"CA certificate: {found.cert_path}")
    click.echo(f"SHA-256 fingerprint: {found.sha256}")
    if found.created:
        click.echo(f"made now, in {found.folder}")
    if export_to is not None:
        click.echo(f"wrote the certificate to {export_to}")
