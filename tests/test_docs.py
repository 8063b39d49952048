"""docs/architecture.md must point at files and names that exist.

Every code span that looks like a repository path (it contains ``/`` or ends in .py, .md, .json or
.toml) must name a file or folder relative to the repository root; a span ``path::Name`` (or
``path::Class.method``) must also name something defined in that file. Spans containing a
placeholder (``<output_dir>/...``, ``hf_vitprune/methods/<name>.py``) or spaces are prose, not paths.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"

CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
PATH_LIKE = re.compile(r"^[A-Za-z0-9_.\-/]+(::[A-Za-z_][A-Za-z0-9_.]*)?$")
EXTENSIONS = (".py", ".md", ".json", ".toml")


def path_references(text: str) -> list[tuple[str, str | None]]:
    """(path, name or None) of every code span in ``text`` that looks like a repository path."""
    references = []
    for span in CODE_SPAN.findall(text):
        span = span.strip()
        if not PATH_LIKE.match(span):
            continue  # placeholders (<...>), calls, prose
        path, _, name = span.partition("::")
        if "/" in path or path.endswith(EXTENSIONS):
            references.append((path, name or None))
    return references


def _defines(source: str, name: str) -> bool:
    """Whether ``source`` defines ``name`` (a class, function, module constant, or a method of a class)."""
    if "." in name:
        owner, _, member = name.partition(".")
        match = re.search(rf"^class {re.escape(owner)}\b.*$", source, re.MULTILINE)
        if match is None:
            return False
        body = []
        for line in source[match.end() + 1 :].splitlines():
            if line.strip() and not line[0].isspace() and not line.startswith(")"):
                break  # the next top-level statement ends the class
            body.append(line)
        return _defines_member("\n".join(body), member)
    return bool(
        re.search(rf"^(class|def|async def) {re.escape(name)}\b", source, re.MULTILINE)
        or re.search(rf"^{re.escape(name)}\s*[:=]", source, re.MULTILINE)
        or re.search(rf"^\s+(async )?def {re.escape(name)}\b", source, re.MULTILINE)
    )


def _defines_member(body: str, member: str) -> bool:
    if "." in member:  # nested class
        return _defines(re.sub(r"^    ", "", body, flags=re.MULTILINE), member)
    return bool(
        re.search(rf"^\s+(async )?def {re.escape(member)}\b", body, re.MULTILINE)
        or re.search(rf"^\s+class {re.escape(member)}\b", body, re.MULTILINE)
        or re.search(rf"^\s+{re.escape(member)}\s*[:=]", body, re.MULTILINE)
    )


def broken_references(text: str, root: Path = ROOT) -> list[str]:
    """Every path reference of ``text`` that does not resolve inside ``root``, with the reason."""
    problems = []
    root = root.resolve()
    for path, name in path_references(text):
        target = (root / path).resolve()
        if path.startswith("/") or ".." in Path(path).parts or not target.is_relative_to(root):
            problems.append(f"{path}: points outside the repository")
            continue
        if not target.exists():
            problems.append(f"{path}: no such file or folder")
            continue
        if name is not None:
            if not target.is_file():
                problems.append(f"{path}::{name}: {path} is not a file")
            elif not _defines(target.read_text(encoding="utf-8"), name):
                problems.append(f"{path}::{name}: {name} is not defined in {path}")
    return problems


def outside_pointers(text: str) -> list[str]:
    """Anything in ``text`` that points outside the repository: ../ paths, shared/, absolute paths, links."""
    found = re.findall(r"\.\./\S*|(?<![\w<>])shared/\S*|(?<![\w.<>`/])/(?:work|home|tmp|usr|etc)/\S*", text)
    found += [target for target in re.findall(r"\]\(([^)]+)\)", text) if not target.startswith(("http", "#"))]
    return found


@pytest.fixture(scope="module")
def doc_text() -> str:
    assert DOC.is_file(), f"{DOC.relative_to(ROOT)} is missing"
    return DOC.read_text(encoding="utf-8")


def test_doc_references_resolve(doc_text):
    references = path_references(doc_text)
    assert len(references) >= 20, f"expected the doc to reference many files, found {len(references)}"
    assert broken_references(doc_text) == []


def test_doc_points_nowhere_outside_the_repository(doc_text):
    assert outside_pointers(doc_text) == []


def test_doc_mentions_every_method_module(doc_text):
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "hf_vitprune" / "methods").glob("*.py"))
    assert "hf_vitprune/methods/base.py" in modules
    missing = [module for module in modules if f"`{module}" not in doc_text]
    assert missing == [], f"docs/architecture.md does not mention {missing}"


def test_doc_length_is_reasonable(doc_text):
    assert 60 <= len(doc_text.splitlines()) <= 200


def test_checker_reports_bogus_references(doc_text):
    bogus = doc_text + "\n".join([
        "",
        "- `hf_vitprune/no_such_module.py`",
        "- `hf_vitprune/methods/base.py::NoSuchClass`",
        "- `hf_vitprune/methods/base.py::PruningMethod.no_such_hook`",
        "- `hf_vitprune/trainer.py::_run_search`",  # a method, but the module has no top-level def: still found
        "- `docs/missing.md`",
        "- `../shared/notes.md`",
        "- `hf_vitprune/methods/admm.py::ADMMState.penalty`",  # fine
        "",
    ])
    problems = broken_references(bogus)
    assert problems == [
        "hf_vitprune/no_such_module.py: no such file or folder",
        "hf_vitprune/methods/base.py::NoSuchClass: NoSuchClass is not defined in hf_vitprune/methods/base.py",
        "hf_vitprune/methods/base.py::PruningMethod.no_such_hook: PruningMethod.no_such_hook is not defined in "
        "hf_vitprune/methods/base.py",
        "docs/missing.md: no such file or folder",
        "../shared/notes.md: points outside the repository",
    ]
    assert outside_pointers(bogus) == ["../shared/notes.md`"]


def test_checker_scopes_methods_to_their_class():
    source = "class A:\n    def hook(self):\n        pass\n\n\nclass B:\n    x: int = 1\n"
    assert _defines(source, "A.hook")
    assert not _defines(source, "B.hook")
    assert _defines(source, "B.x")
    assert _defines(source, "B")
    assert not _defines(source, "C")


def test_path_references_skip_placeholders_and_prose():
    text = "`<output_dir>/finetune` `hf_vitprune/methods/<name>.py` `PruningConfig(method=...)` `a b/c` `x.py::f`"
    assert path_references(text) == [("x.py", "f")]
