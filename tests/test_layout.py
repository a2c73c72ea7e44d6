"""The layout's import rules, read from the code itself (every module's imports, parsed, not run).

    fedrad/ (cli, lab)          may import both roles
    server/   client/           never each other
    common/                     neither role, nor anything above it

and no module anywhere imports the old bare names (`common`, `server`, `client`), and no
two modules import each other, directly or around a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> the package it installs as (pyproject's [tool.setuptools.package-dir]).
PACKAGES = {"common": "fedrad.common", "server": "fedrad.server", "client": "fedrad.client", "fedrad": "fedrad"}
BARE = ("common", "server", "client")
ROLES = ("fedrad.server", "fedrad.client")
ABOVE = ("fedrad.lab", "fedrad.cli", "fedrad.cli_deploy", "fedrad.cli_site")  # what stands above both roles


def module_name(path: Path) -> str:
    """The installed dotted name of a source file: server/app.py -> fedrad.server.app."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] in PACKAGES:
        parts = [*PACKAGES[rel.parts[0]].split("."), *rel.parts[1:]]
    else:
        parts = list(rel.parts)  # tests/...
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (function-level imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule in a {module: imported modules} graph, as one sentence each."""
    problems = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if target.split(".")[0] in BARE:
                problems.append(f"{module} imports the bare name {target} (use fedrad.{target})")
            elif within(module, "fedrad.common") and within(target, "fedrad") and not within(target, "fedrad.common"):
                problems.append(f"{module} (common) imports {target}: common imports no role and nothing above it")
            for role in ROLES:
                other = ROLES[1 - ROLES.index(role)]
                if within(module, role) and within(target, other):
                    problems.append(f"{module} imports {target}: the coordinator and the site never import each other")
                if within(module, role) and any(within(target, above) for above in ABOVE):
                    problems.append(f"{module} imports {target}: a role never imports the lab or the command line")
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import circles among the graph's own modules (Tarjan's strongly connected components of size > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def project_graph(*folders: str) -> dict[str, set[str]]:
    graph = {module_name(p): imports_of(p) for p in source_files(*folders)}
    # `from fedrad.client import site_store` names a module; `from x.y import f` names x.y (f is not a module).
    return {m: {t for t in targets if t in graph or t.rpartition(".")[0] not in graph} for m, targets in graph.items()}


def test_every_module_follows_the_import_rules():
    assert violations(project_graph(*PACKAGES, "tests")) == []


def test_no_two_modules_import_each_other():
    assert circles(project_graph(*PACKAGES)) == []


@pytest.mark.parametrize("module, target, rule", [
    ("fedrad.common.config", "fedrad.server.app", "common imports no role"),
    ("fedrad.common.records", "fedrad.lab.synth", "common imports no role"),
    ("fedrad.server.app", "fedrad.client.train", "never import each other"),
    ("fedrad.client.app", "fedrad.server.strategy", "never import each other"),
    ("fedrad.client.app", "fedrad.lab.simulate", "never imports the lab"),
    ("fedrad.lab.simulate", "client.app", "bare name"),
])
def test_the_rules_catch_a_back_import(module, target, rule):
    graph = project_graph(*PACKAGES)
    graph[module] = graph[module] | {target}
    assert any(rule in problem for problem in violations(graph)), violations(graph)


def test_a_circle_is_found():
    graph = project_graph(*PACKAGES)
    graph["fedrad.client.dataset"] = graph["fedrad.client.dataset"] | {"fedrad.client.loaded_sites"}
    assert any({"fedrad.client.dataset", "fedrad.client.loaded_sites"} <= set(c) for c in circles(graph))


def test_the_lab_and_the_command_line_stand_above_both_roles():
    graph = project_graph(*PACKAGES)
    users = {m for m, targets in graph.items()
             if any(within(t, "fedrad.server") for t in targets) and any(within(t, "fedrad.client") for t in targets)}
    assert users and all(any(within(m, above) for above in ABOVE) for m in users), users


def architecture_tree() -> set[str]:
    """The module paths the README's Architecture tree lists (folders by indentation)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    tree = section.split("```\npyproject.toml", 1)[1].split("```", 1)[0]
    listed, folders = set(), []  # folders: (indent, name) of the enclosing folders
    for line in tree.splitlines():
        stripped = line.lstrip()
        if not stripped:
            continue
        indent, word = len(line) - len(stripped), stripped.split()[0]
        folders = [(i, f) for i, f in folders if i < indent]
        if word.endswith("/"):
            folders.append((indent, word))
        elif word.endswith(".py"):
            listed.add("".join(f for _, f in folders) + word)
    return listed


def test_the_readme_architecture_lists_every_module_where_it_is():
    actual = {str(p.relative_to(ROOT)) for p in source_files("fedrad", "common", "server", "client")
              if p.name != "__init__.py"}
    listed = architecture_tree()
    assert sorted(actual - listed) == [], "modules missing from the README's Architecture tree"
    assert sorted(listed - actual - {"tests/test_layout.py"}) == [], "the README lists modules that do not exist"
