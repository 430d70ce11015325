"""The package's import directions, read from the source (every import, lazy ones included).

    coverwatch.streamer       the runtime: imports nothing of the project but itself
    coverwatch.index_builder  may import the runtime; never the model side
    coverwatch.model          may import both (training uses the runtime's constants and files)
    coverwatch.evaluation     may import all three; only the command line imports it
    coverwatch.cli            imports everything

No module of the runtime imports torch (or nnAudio), even inside a function, and the module
graph has no cycles. After an install, the project is importable only as `coverwatch.*`.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each sub-package's source lives (pyproject.toml's [tool.setuptools.package-dir]).
PACKAGE_DIRS = {
    "coverwatch": ROOT / "coverwatch",
    "coverwatch.streamer": ROOT / "streamer",
    "coverwatch.index_builder": ROOT / "index_builder",
    "coverwatch.model": ROOT / "model",
}
RUNTIME = ("coverwatch.streamer", "coverwatch.index_builder")
TRAINING_ONLY = ("torch", "nnAudio", "torchaudio", "onnxscript")
GENERIC_NAMES = ("streamer", "model", "index_builder", "evaluation")


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "coverwatch" and parts[:1] in (["streamer"], ["index_builder"], ["model"]):
                continue  # not possible today; guards against a folder shadowing a mapped package
            modules[name] = path
    return modules


def imports_of(path: Path) -> list[tuple[int, str, str | None]]:
    """Every import in a file, at any depth: (line, module, imported name or None)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
    return found


def project_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from pkg import mod` counts as mod)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, module, imported in imports_of(path):
            target = f"{module}.{imported}" if imported and f"{module}.{imported}" in modules else module
            if target in modules and target != name:
                edges[name].add(target)
    return edges


def within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_package_layout_is_read_from_the_tree():
    modules = module_files()
    assert len(modules) > 50
    for expected in ("coverwatch.cli", "coverwatch.streamer.service.daemon", "coverwatch.streamer.frontend.rolling",
                     "coverwatch.index_builder.build", "coverwatch.model.train", "coverwatch.evaluation.demo"):  # fmt: skip
        assert expected in modules


def test_no_file_imports_a_generic_top_level_name():
    # the project's own files: not hidden folders (.git, the .venv that scripts/demo.sh makes, whose
    # site-packages hold third-party files, some not even parseable) and not a build/ output
    files = [
        p for p in ROOT.rglob("*.py")
        if not any(part.startswith(".") for part in p.relative_to(ROOT).parts) and p.relative_to(ROOT).parts[0] != "build"
    ]
    problems = [
        f"{path.relative_to(ROOT)}:{line}: import {module}"
        for path in files
        for line, module, _ in imports_of(path)
        if module.split(".")[0] in GENERIC_NAMES
    ]
    assert problems == []


def test_runtime_never_imports_the_model_side_evaluation_cli_or_torch():
    modules = module_files()
    problems = []
    for name, path in modules.items():
        if not within(name, *RUNTIME):
            continue
        for line, module, imported in imports_of(path):
            full = f"{module}.{imported}" if imported else module
            if module.split(".")[0] in TRAINING_ONLY or within(full, "coverwatch.model", "coverwatch.evaluation", "coverwatch.cli"):
                problems.append(f"{path.relative_to(ROOT)}:{line}: {name} imports {full}")
            if within(name, "coverwatch.streamer") and within(full, "coverwatch.index_builder"):
                problems.append(f"{path.relative_to(ROOT)}:{line}: the runtime imports the index builder ({full})")
    assert problems == []


def test_only_the_command_line_imports_evaluation_and_the_model_side_never_does():
    edges = project_edges(module_files())
    importers = sorted(
        name
        for name, targets in edges.items()
        if not within(name, "coverwatch.evaluation") and any(within(t, "coverwatch.evaluation") for t in targets)
    )
    assert importers == ["coverwatch.cli"]
    assert not any(within(t, "coverwatch.cli") for name, targets in edges.items() for t in targets if name != "coverwatch.__main__")


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the graph's components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
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
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def test_the_module_graph_has_no_cycles():
    assert strongly_connected(project_edges(module_files())) == []


def test_a_cycle_is_found():
    """The cycle check itself: a -> b -> c -> a is one component, d stands alone."""
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_installed_package_resolves_only_under_coverwatch(tmp_path):
    """Outside the checkout (another working directory, no PYTHONPATH) the runtime imports
    as coverwatch.* without pulling in torch, and the generic names do not resolve."""
    program = (
        "import importlib, importlib.util, pkgutil, sys\n"
        "import coverwatch.streamer, coverwatch.index_builder\n"
        "for pkg in (coverwatch.streamer, coverwatch.index_builder):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted(n for n in ('streamer', 'model', 'index_builder', 'evaluation') if importlib.util.find_spec(n)))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nnAudio') or m.startswith('coverwatch.model')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "[]"]
