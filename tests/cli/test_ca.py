"""`keyswap ca`: the path and fingerprint, as text or JSON, and `--export`."""

import json
from pathlib import Path

from click.testing import CliRunner

from keyswap.cli.main import main
from keyswap.forward import ca


def test_text_json_and_export(tmp_path: Path) -> None:
    config = tmp_path / "keyswap.yaml"
    config.write_text("version: 1\n")
    first = CliRunner().invoke(main, ["ca", "--config", str(config)])
    assert first.exit_code == 0, first.output
    found = ca.ensure(tmp_path / "keyswap-ca")
    assert first.output == (
        f"CA certificate: {found.cert_path}\n"
        f"SHA-256 fingerprint: {found.sha256}\n"
        f"made now, in {found.folder}\n"
    )
    out = tmp_path / "exported.pem"
    shown = CliRunner().invoke(
        main, ["ca", "--config", str(config), "--export", str(out), "--json"]
    )
    assert json.loads(shown.output) == {
        "path": str(found.cert_path),
        "sha256": found.sha256,
        "created": False,
        "exported": str(out),
    }
    assert out.read_bytes() == found.pem


def test_an_unusable_folder_says_what_to_do(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    result = CliRunner().invoke(main, ["ca", "--ca-dir", str(blocked / "sub")])
    assert result.exit_code == 1
    assert f"no usable CA in {blocked / 'sub'}" in result.output and "--ca-dir" in result.output
