"""The core never imports a plugin: every module under specframe/ (the sub-packages that map to plugins/
and policies/ aside) reaches components through the registry, never through ``specframe.plugins`` or
``specframe.policies``. Read from the AST, so a function-level import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import specframe

CORE = Path(specframe.__file__).parent
FORBIDDEN = ("specframe.plugins", "specframe.policies")


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of everything ``path`` (a module under ``root``) imports; ``from M
    import x`` counts as ``M.x``, so importing a plugin module by name from its package is caught too."""
    package = [root.name, *path.relative_to(root).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return out


def offenders(root: Path) -> list[str]:
    """``file:line imports module`` for every import of a plugin or policy module under ``root``."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] in ("plugins", "policies"):
            continue
        for line, module in imported_modules(path, root):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN):
                bad.append(f"{path.relative_to(root.parent)}:{line} imports {module}")
    return bad


def test_core_never_imports_plugins():
    assert CORE.name == "specframe" and (CORE / "engine.py").is_file()
    assert offenders(CORE) == []


def test_the_walk_sees_every_import_form(tmp_path):
    """A self-test of the detector: absolute, from-, relative and function-level imports are all caught."""
    pkg = tmp_path / "specframe"
    (pkg / "tools").mkdir(parents=True)
    (pkg / "a.py").write_text("import specframe.plugins.hybrid\n")
    (pkg / "b.py").write_text("def f():\n    from specframe.plugins.dflash import DFlashModel\n")
    (pkg / "tools" / "c.py").write_text("from ..plugins import hybrid\nfrom .. import policies\n")
    (pkg / "d.py").write_text("from specframe import plugins\nfrom . import engine\nimport specframe.tree\n")
    found = offenders(pkg)
    assert [f.split(" imports ")[0] for f in found] == [
        "specframe/a.py:1", "specframe/b.py:2", "specframe/d.py:1", "specframe/tools/c.py:1", "specframe/tools/c.py:2"]


def test_the_simulator_has_no_decoding_logic_of_its_own():
    """`specframe simulate` decodes through the engine only: its modules call no verifier, expansion
    policy, surrogate / cost-model observer or draft gate — and import none of the engine's parts that do."""
    decoding = {"verify", "expand", "observe", "want", "record", "keep", "calibrate"}
    for name in ("simulate.py", "trace.py"):
        tree = ast.parse((CORE / "tools" / name).read_text())
        called = {node.func.attr for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        assert called & decoding == set(), name
        modules = {m for _, m in imported_modules(CORE / "tools" / name, CORE)}
        assert not {m for m in modules if m.startswith(("specframe.gate", "specframe.fit", "specframe.learning"))}, name


RUNTIMES = ("transformers", "llama_cpp")


def test_core_imports_no_runtime():
    """Every runtime is a plugin: no module of the core imports transformers or llama-cpp-python (read
    from the AST, so a function-level import counts too)."""
    bad = []
    for path in sorted(CORE.rglob("*.py")):
        for line, module in imported_modules(path, CORE):
            if any(module == r or module.startswith(r + ".") for r in RUNTIMES):
                bad.append(f"{path.relative_to(CORE.parent)}:{line} imports {module}")
    assert bad == []


def test_importing_the_core_loads_no_runtime():
    """Importing the core (and resolving ``specframe.Target`` through the registry) loads neither runtime
    until a model is loaded: checked in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys, specframe, specframe.engine, specframe.cli, specframe.serve, specframe.tools.bench, "
            "specframe.tools.simulate\n"
            "from specframe import Target, Registry\n"
            "from specframe.target import Target as T2, embedded_model_dir\n"
            "assert Target is T2 and Target.__module__ == 'specframe.plugins.hf', Target.__module__\n"
            "Registry().names('backend')\n"
            f"print(sorted(m for m in {RUNTIMES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
