"""The documentation is tested like code.

* Every fenced ``python`` block of every page under ``docs/`` runs: the blocks of one page in order, in
  one namespace, in a temporary working directory. A block preceded by the line ``<!-- docs-test: skip -->``
  is not run (use it sparingly: only for code that needs what a test machine lacks, e.g. a GPU or a hub
  download). A page containing ``<!-- docs-test: slow -->`` loads the real embedded model, so its test is
  marked ``slow``. ``--8<-- "path"`` lines (pymdownx.snippets) are replaced by the file they include, so an
  included source file runs as the reader sees it.
* ``bash`` blocks are documentation, but every ``specframe ...`` command line in them is parsed against the
  real CLI (subcommand, option names and types, policy names), so a renamed flag breaks the docs test.
* The example third-party plugin (``examples/specframe-costmodel-example``) is found through a REAL entry
  point: its ``pyproject.toml`` is turned into a ``.dist-info`` (METADATA + entry_points.txt) on
  ``sys.path``, exactly what ``pip install`` writes; a slow test also pip-installs it for real.
* The API reference lists exactly the hookspecs of ``specframe/hookspecs.py``, and every hookspec is
  implemented (``@hookimpl``, also in plugin source a test installs) or called by code that a test in
  another file runs: read from the syntax tree, so a mention in a comment or a string does not count.
* ``mkdocs build --strict`` succeeds (skipped when the docs tools are not installed).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from specframe import Registry, SpecGenerator, hookspecs, make_plugin_set
from specframe.errors import UnknownComponentError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLE = ROOT / "examples" / "specframe-costmodel-example"
EXAMPLE_MODULE = "specframe_costmodel_example"
SKIP = "<!-- docs-test: skip -->"
SLOW = "<!-- docs-test: slow -->"
SNIPPET = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$')
MAX_SKIPPED_BLOCKS = 2  # "sparingly": raise only with a reason the skip marker cannot avoid


# ---------------------------------------------------------------------- markdown code blocks
@dataclass
class Block:
    page: Path
    lang: str
    code: str
    line: int  # 1-based line of the first code line in the page
    skip: bool


def _expand_snippets(code: str) -> str:
    out = []
    for line in code.splitlines():
        m = SNIPPET.match(line)
        out.append((ROOT / m.group(1)).read_text().rstrip("\n") if m else line)
    return "\n".join(out)


def code_blocks(page: Path) -> list[Block]:
    """The top-level fenced code blocks of a markdown page, in order."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})(.*)$", lines[i])
        if not fence:
            i += 1
            continue
        ticks, lang = fence.group(1), (fence.group(2).strip().split() or [""])[0]
        end = i + 1
        while end < len(lines) and lines[end].strip() != ticks:
            end += 1
        prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        code = _expand_snippets("\n".join(lines[i + 1 : end]))
        blocks.append(Block(page, lang, code, i + 2, prev == SKIP))
        i = end + 1
    return blocks


def _rel(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


ALL_PAGES = sorted(DOCS.rglob("*.md"))
CODE_PAGES = [p for p in ALL_PAGES if any(b.lang == "python" for b in code_blocks(p))]
TUTORIALS = [p for p in sorted((DOCS / "tutorials").glob("*.md")) if p.name != "index.md"]


def run_page(page: Path) -> dict:
    """Execute the page's runnable python blocks in order in one namespace; return the namespace.

    Each block is compiled with the page as file name and its real line numbers, so a traceback points
    at the line of the markdown file."""
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for block in code_blocks(page):
        if block.lang == "python" and not block.skip:
            exec(compile("\n" * (block.line - 1) + block.code, str(page), "exec"), namespace)  # noqa: S102
    return namespace


# ---------------------------------------------------------------------- the example plugin, installed
def _example_project() -> dict:
    return tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]


def _installed_for_real() -> bool:
    try:
        md.distribution(_example_project()["name"])
    except md.PackageNotFoundError:
        return False
    return True


@pytest.fixture
def example_plugin_installed(tmp_path, monkeypatch):
    """Make the example plugin installed for this test, through a real entry point.

    Writes the ``.dist-info`` that ``pip install`` would (METADATA and entry_points.txt, generated from the
    package's own pyproject.toml) into a temporary site directory and puts it and the package source on
    ``sys.path``. If the package is really installed already, that installation is used as it is."""
    monkeypatch.delenv("SPECFRAME_PLUGINS", raising=False)
    if not _installed_for_real():
        project = _example_project()
        site = tmp_path / "site-packages"
        info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
        )
        lines = ["[specframe]"] + [f"{k} = {v}" for k, v in project["entry-points"]["specframe"].items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(EXAMPLE))
        monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield
    sys.modules.pop(EXAMPLE_MODULE, None)
    importlib.invalidate_caches()


def test_example_pyproject_declares_the_entry_point():
    project = _example_project()
    assert project["name"] == "specframe-costmodel-example"
    assert project["entry-points"]["specframe"] == {"costmodel-example": EXAMPLE_MODULE}
    assert (EXAMPLE / f"{EXAMPLE_MODULE}.py").is_file()


def test_example_plugin_is_found_through_its_entry_point(example_plugin_installed):
    eps = [ep for ep in md.entry_points(group="specframe") if ep.name == "costmodel-example"]
    assert [ep.value for ep in eps] == [EXAMPLE_MODULE]
    plugin_set = make_plugin_set()
    info = next((p for p in plugin_set.plugins if p.name == "costmodel-example"), None)
    assert info is not None, [p.name for p in plugin_set.plugins]
    assert (info.distribution, info.builtin) == ("specframe-costmodel-example", False)
    assert info.hooks == ["register_cost_models"]
    assert info.version == _example_project()["version"]
    assert not [p for p in plugin_set.problems if "costmodel-example" in p]


def test_example_cost_model_is_registered_with_its_parameters(example_plugin_installed):
    registry = Registry()
    assert registry.get("cost_model", "example-linear").plugin == "costmodel-example"
    assert list(registry.parameters("cost_model", "example-linear")) == ["a", "b", "e"]


PROMPT = [5, 9, 13, 5, 9, 13, 5, 9, 13, 5, 9]  # repetitive: the ngram drafter finds matches


def test_example_cost_model_drives_bastion(example_plugin_installed, tiny_target):
    reference = SpecGenerator(tiny_target, "ar").generate(PROMPT, 12).token_ids
    sizes = {}
    for b in (1e-4, 10.0):
        gen = SpecGenerator(tiny_target, "bastion", params={"cost_model": "example-linear", "b": b})
        cost = gen.components.cost_model
        assert type(cost).__module__ == EXAMPLE_MODULE and cost.b == b
        assert gen.components.names["cost_model"] == "example-linear"
        out = gen.generate(PROMPT, 12)
        assert out.token_ids == reference
        assert cost.observed == out.stats.steps
        for r in out.stats.records:
            assert r.predicted_verify_s == pytest.approx(cost.a + cost.b * r.tree_size + cost.e * r.context_len)
        sizes[b] = out.stats.mean_tree_size
    # b = 10 s per node: no node pays for itself, every tree is the root alone; b ≈ 0: trees grow.
    assert sizes[10.0] == 1.0
    assert sizes[1e-4] > 1.0


@pytest.mark.parametrize(
    "allow, listed",
    [("", False), ("costmodel-example", True), ("specframe-costmodel-example", True), ("someone-else", False)],
)
def test_specframe_plugins_env_switches_the_example_off(example_plugin_installed, monkeypatch, allow, listed):
    monkeypatch.setenv("SPECFRAME_PLUGINS", allow)
    plugin_set = make_plugin_set()
    assert ("costmodel-example" in [p.name for p in plugin_set.plugins]) is listed
    registry = Registry(plugin_set)
    assert "bastion" in registry.policies  # built-ins always load
    if listed:
        registry.get("cost_model", "example-linear")
    else:
        with pytest.raises(UnknownComponentError):
            registry.get("cost_model", "example-linear")


@pytest.mark.slow
def test_example_package_pip_installs_and_is_listed_by_the_cli(tmp_path):
    """Build and install the example for real (no network, no dependencies) into a private target dir."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed, so the example cannot be built without network access")
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]

    def plugins(allow: str | None) -> list[dict]:
        env = {**os.environ, "PYTHONPATH": str(site)}
        env.pop("SPECFRAME_PLUGINS", None)
        if allow is not None:
            env["SPECFRAME_PLUGINS"] = allow
        cmd = [sys.executable, "-c", "from specframe.cli import main; main()", "plugins", "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)["plugins"]

    row = next((p for p in plugins(None) if p["name"] == "costmodel-example"), None)
    assert row is not None
    assert row["distribution"] == "specframe-costmodel-example"
    assert row["provides"] == ["cost_model:example-linear"]
    assert "costmodel-example" not in [p["name"] for p in plugins("")]


# ---------------------------------------------------------------------- page structure
def test_every_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text()
    missing = [_rel(p) for p in ALL_PAGES if _rel(p) not in config]
    assert not missing, f"pages missing from mkdocs.yml nav: {missing}"


def test_every_tutorial_runs_code():
    assert len(TUTORIALS) >= 5
    for page in TUTORIALS:
        runnable = [b for b in code_blocks(page) if b.lang == "python" and not b.skip]
        assert runnable, f"{_rel(page)} has no runnable python block"


def test_python_fences_are_top_level():
    """An indented fence (inside an admonition or a list) would silently not be run."""
    for page in ALL_PAGES:
        fences = len(re.findall(r"^\s*```python", page.read_text(), flags=re.M))
        parsed = sum(b.lang == "python" for b in code_blocks(page))
        assert fences == parsed, f"{_rel(page)}: a ```python fence is indented; the docs test cannot run it"


def test_skip_marker_is_used_sparingly():
    skipped = [f"{_rel(b.page)}:{b.line}" for p in ALL_PAGES for b in code_blocks(p) if b.skip]
    assert len(skipped) <= MAX_SKIPPED_BLOCKS, f"too many skipped doc blocks: {skipped}"


def test_snippets_resolve():
    for page in ALL_PAGES:
        for line in page.read_text().splitlines():
            m = SNIPPET.match(line)
            if m:
                assert (ROOT / m.group(1)).is_file(), f"{_rel(page)} includes missing file {m.group(1)}"


# ---------------------------------------------------------------------- CLI lines in shell blocks
def _command_lines(block: Block) -> list[list[str]]:
    text = block.code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for sep in ("|", ">", "&&", ";"):
            if sep in words:
                words = words[: words.index(sep)]
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # leading VAR=value assignments
            words = words[1:]
        if words and words[0] == "specframe":
            out.append(words[1:])
    return out


SHELL_COMMANDS = [
    pytest.param(words, id=f"{_rel(b.page)}:{b.line}:{' '.join(words)[:40]}")
    for p in ALL_PAGES
    for b in code_blocks(p)
    if b.lang in ("bash", "sh", "console", "shell")
    for words in _command_lines(b)
]


@pytest.fixture(scope="module")
def builtin_registry():
    return Registry(make_plugin_set(allow=set()))


@pytest.mark.parametrize("words", SHELL_COMMANDS)
def test_shell_commands_in_docs_parse(words, builtin_registry):
    from specframe.tools.bench import check_methods, split_methods
    from specframe.cli import cli

    if not words or words[0] in ("-h", "--help", "--version"):
        return
    command = cli.get_command(click.Context(cli), words[0])
    assert command is not None, f"no such command: specframe {words[0]}"
    if {"-h", "--help"} & set(words):
        return  # parsing would print the help and exit
    try:
        ctx = command.make_context(words[0], list(words[1:]))
    except click.ClickException as err:
        pytest.fail(f"`specframe {' '.join(words)}` does not parse: {err.format_message()}")
    if ctx.params.get("policy"):
        builtin_registry.policy(ctx.params["policy"].partition(":")[0])
    if words[0] == "bench":
        check_methods(split_methods(ctx.params["methods"]), builtin_registry)


# ---------------------------------------------------------------------- hookspecs: documented and tested
HOOKSPECS = sorted(name for name, obj in vars(hookspecs).items() if hasattr(obj, "specframe_spec"))


def test_hookspecs_are_found():
    assert len(HOOKSPECS) >= 9 and "register_cost_models" in HOOKSPECS


def _reference_hooks() -> tuple[list[str], list[str]]:
    """(the hooks in the reference's table, the members its ``::: specframe.hookspecs`` block renders)."""
    page = (DOCS / "reference" / "hookspecs.md").read_text()
    table = re.findall(r"^\|\s*`(\w+)`\s*\|", page, flags=re.M)
    assert "::: specframe.hookspecs" in page
    block = page[page.index("::: specframe.hookspecs"):]
    members = re.search(r"^\s*members:\s*\n((?:[ \t]*- \w+[ \t]*(?:\n|$))+)", block, flags=re.M)
    assert members, "the ::: specframe.hookspecs block lists no members"
    return table, re.findall(r"- (\w+)", members.group(1))


def test_the_reference_lists_exactly_the_hookspecs():
    """Every hookspec once in the table and once among the rendered members, and nothing else there
    (a removed or renamed hook must leave the reference too)."""
    table, members = _reference_hooks()
    assert sorted(table) == HOOKSPECS, f"table rows {table} vs hookspecs {HOOKSPECS}"
    assert sorted(members) == HOOKSPECS, f"members {members} vs hookspecs {HOOKSPECS}"


def _is_hookimpl(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Name) and target.id == "hookimpl") or (
        isinstance(target, ast.Attribute) and target.attr == "hookimpl")


def hook_uses(source: str) -> set[str]:
    """Hooks a piece of test code really uses, read from its syntax tree (comments and prose do not
    count): a function named after a hookspec and decorated ``@hookimpl`` (also inside plugin source
    that the test keeps in a string and installs), or a call ``<...>.hook_name(...)``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in HOOKSPECS:
            if any(_is_hookimpl(d) for d in node.decorator_list):
                found.add(node.name)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in HOOKSPECS:
            found.add(node.func.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "hookimpl" in node.value:
            try:
                found |= hook_uses(textwrap.dedent(node.value))
            except SyntaxError:
                pass  # prose, not plugin source
    return found


def reachable_from_tests(source: str) -> list[str]:
    """The source of every test function, test class and fixture of a test module, and of every
    module-level definition (class, function, constant) they reach by name: what running it executes."""
    module = ast.parse(source)
    defined: dict[str, ast.stmt] = {}
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    defined[target.id] = node

    def is_entry(node: ast.stmt) -> bool:
        if isinstance(node, ast.ClassDef):
            return node.name.startswith("Test")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node.name.startswith("test_") or any("fixture" in ast.unparse(d) for d in node.decorator_list)
        return False

    todo = [name for name, node in defined.items() if is_entry(node)]
    reached: set[str] = set()
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo += [sub.id for sub in ast.walk(defined[name]) if isinstance(sub, ast.Name) and sub.id in defined]
    return [ast.unparse(defined[name]) for name in sorted(reached)]


def _uses_in_tests(source: str) -> set[str]:
    return set().union(*(hook_uses(src) for src in reachable_from_tests(source)))


HOOK_USE_SAMPLE = '''
# register_drafters is only mentioned here
NAMES = {"x": "register_surrogates"}
PLUGIN = """
    from specframe import hookimpl

    @hookimpl
    def register_verifiers(register):
        register("v", object)
"""


class Unused:  # never reached from a test
    @hookimpl
    def register_policies(self, register):
        pass


class Observer:
    @hookimpl(tryfirst=True)
    def on_step_end(self, record, step):
        pass


def register_cost_models(register):  # not decorated: not a hook implementation
    pass


def test_one():
    """register_commands, in a docstring."""
    install(PLUGIN, NAMES, register_cost_models)
    pm.hook.on_run_end(stats=None)
    Observer()
'''


def test_hook_use_detection_reads_code_not_text():
    """The detector behind the next test: a mention in a comment, a docstring or a plain string is no
    use, nor an undecorated function or a plugin no test reaches; an @hookimpl a test reaches, a hook
    call, or plugin source a test installs is."""
    assert _uses_in_tests(HOOK_USE_SAMPLE) == {"register_verifiers", "on_run_end", "on_step_end"}


@pytest.mark.parametrize("name", HOOKSPECS)
def test_hookspec_is_exercised_by_a_test(name):
    """Some test outside this file implements the hook in a plugin it installs, or calls it."""
    here = Path(__file__).resolve()
    users = [p.name for p in sorted(here.parent.glob("test_*.py")) if p != here and name in _uses_in_tests(p.read_text())]
    assert users, f"no test under tests/ (other than {here.name}) implements or calls the hook {name}"


# ---------------------------------------------------------------------- mkdocs
def test_mkdocs_build_strict(tmp_path):
    tools = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")
    missing = [m for m in tools if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"docs tools not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    html = (site / "reference" / "hookspecs" / "index.html").read_text()
    for name in HOOKSPECS:
        assert f'id="specframe.hookspecs.{name}"' in html, f"hookspec {name} missing from the rendered reference"


# ---------------------------------------------------------------------- run the pages
PAGE_FIXTURES = {"tutorials/cost-model-plugin.md": ["example_plugin_installed"]}


def _page_param(page: Path):
    marks = [pytest.mark.slow] if SLOW in page.read_text() else []
    return pytest.param(page, id=_rel(page), marks=marks)


@pytest.mark.parametrize("page", [_page_param(p) for p in CODE_PAGES])
def test_page_code_runs(page, request, tmp_path, monkeypatch):
    slow = SLOW in page.read_text()  # pages that load the real model get it converted by the one fixture
    for fixture in PAGE_FIXTURES.get(_rel(page), []) + (["embedded_model_dir"] if slow else []):
        request.getfixturevalue(fixture)
    monkeypatch.chdir(tmp_path)
    run_page(page)


def test_real_model_pages_are_marked_slow():
    """A page that loads a model must carry the slow marker, or `make test-fast` would load it."""
    loaders = ("Target.load(", "from_pretrained(", "run_bench(")
    for page in CODE_PAGES:
        code = "\n".join(b.code for b in code_blocks(page) if b.lang == "python" and not b.skip)
        if any(s in code for s in loaders):
            assert SLOW in page.read_text(), f"{_rel(page)} loads a model but is not marked {SLOW}"


# ---------------------------------------------------------------------- regenerating the shown outputs
if __name__ == "__main__":
    # python tests/test_docs.py docs/tutorials/run-bastion.md
    # Runs a page's python blocks like the test does and prints each block's output under its line
    # number, to refresh the ```text output blocks after the library changed.
    import contextlib
    import io
    import tempfile

    for page in [Path(arg).resolve() for arg in sys.argv[1:]]:
        os.chdir(tempfile.mkdtemp())
        namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
        for block in code_blocks(page):
            if block.lang != "python" or block.skip:
                continue
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                exec(compile("\n" * (block.line - 1) + block.code, str(page), "exec"), namespace)  # noqa: S102
            print(f"----- {_rel(page)}: block at line {block.line}\n{buffer.getvalue()}", flush=True)
