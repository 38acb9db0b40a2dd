import click
import pytest

from keyswap.cli.main import main


def commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((f"{prefix}{name}", cmd))
        if isinstance(cmd, click.Group):
            out += commands(cmd, f"{prefix}{name} ")
    return out


@pytest.mark.parametrize(
    ("name", "cmd"), commands(main), ids=lambda x: x if isinstance(x, str) else ""
)
def test_every_command_has_help_with_an_example(name: str, cmd: click.Command) -> None:
    assert cmd.help and "Example:" in cmd.help and f"keyswap {name}" in cmd.help
