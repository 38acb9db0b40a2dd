"""The package's shape: every `keyswap.*` import names a file, no import circle (type-only
imports included: a reader follows those too), and dependencies point one way:
net, then config, then state, then the gateway, then the command line."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.support import ROOT

PACKAGE = ROOT / "addons" / "keyswap"

# Lowest first. A module may import its own layer or a lower one; the longest prefix
# that names a module decides its layer.
LAYERS = (
    "keyswap",
    "keyswap.net",
    "keyswap.config",
    "keyswap.state",
    "keyswap.forward",  # forward mode's pieces that the gateway and the command line use
    "keyswap.gateway",  # settings, the compiled runtime, the pipeline, problem responses
    "keyswap.gateway.stages",
    "keyswap.gateway.connectivity",  # `test-upstream` reaches a proxy as the upstream stage does
    "keyswap.gateway.assembly",
    "keyswap.gateway.script",
    "keyswap.cli",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def file_of(name: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """`(imported module, line)` for every keyswap import, `from keyswap.x import y` as
    `keyswap.x.y` when y is itself a module."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "keyswap":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute keyswap.* imports"
            if node.module is None or node.module.split(".")[0] != "keyswap":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub if file_of(sub) else node.module), node.lineno


def layer(name: str) -> int:
    return max(
        i for i, prefix in enumerate(LAYERS) if name == prefix or name.startswith(prefix + ".")
    )


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in imports(name, path)} - {name} for name, path in modules().items()}


def test_every_keyswap_import_names_a_file() -> None:
    missing = [
        f"{path.relative_to(ROOT)}:{line}: {imported}"
        for name, path in modules().items()
        for imported, line in imports(name, path)
        if file_of(imported) is None
    ]
    assert not missing, "imports that no file answers:\n" + "\n".join(missing)


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{path.relative_to(ROOT)}:{line}: {name} imports {imported}"
        for name, path in modules().items()
        for imported, line in imports(name, path)
        if layer(imported) > layer(name)
    ]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle in `edges`, as the path that closes it, or None."""
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> list[str] | None:
        if node in trail:
            return [*trail[trail.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(edges.get(node, ())):
            if circle := visit(nxt, [*trail, node]):
                return circle
        done.add(node)
        return None

    for start in sorted(edges):
        if circle := visit(start, []):
            return circle
    return None


def test_no_import_circle() -> None:
    circle = find_circle(graph())
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_checks_see_what_they_must() -> None:
    """A circle and an upward import are found when there is one: the checks above
    cannot pass by looking at nothing."""
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
    assert layer("keyswap.gateway.stages.auth") > layer("keyswap.gateway.settings")
    assert layer("keyswap.cli.main") > layer("keyswap.gateway.script")
    assert layer("keyswap.config.model") < layer("keyswap.state.store")
    edges = graph()
    assert "keyswap.gateway.settings" in edges["keyswap.gateway.stages.auth"]
    assert len(edges) == len(list(PACKAGE.rglob("*.py")))
