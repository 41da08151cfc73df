"""docs/guarantees.md and docs/design.md name only tests that exist."""

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
GUARANTEES = ROOT / "docs" / "guarantees.md"
DESIGN = ROOT / "docs" / "design.md"

# tests/<file>.py::<name>, or tests/<file>.py::<Class>::<name>
REFERENCE = re.compile(r"\b(tests/[\w/]+\.py)::(?:(\w+)::)?(\w+)")


def defined_functions(path: Path) -> set[tuple[str | None, str]]:
    """(class or None, name) of every function defined at module or class level in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    functions: set[tuple[str | None, str]] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            functions.add((None, node.name))
        elif isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef):
                    functions.add((node.name, member.name))
    return functions


@pytest.mark.parametrize("doc", [GUARANTEES, DESIGN], ids=["guarantees", "design"])
def test_every_test_named_in_the_doc_exists(doc: Path):
    references = REFERENCE.findall(doc.read_text())
    assert len(references) >= 20, f"{doc.name} names hardly any test"
    missing = []
    parsed: dict[str, set[tuple[str | None, str]]] = {}
    for file, cls, name in references:
        path = ROOT / file
        if not path.is_file():
            missing.append(f"{file}::{name} (no such file)")
            continue
        if file not in parsed:
            parsed[file] = defined_functions(path)
        functions = parsed[file]
        if cls:
            found = (cls, name) in functions
        else:
            found = any(defined == name for _, defined in functions)
        if not name.startswith("test") or not found:
            missing.append(f"{file}::{cls + '::' if cls else ''}{name}")
    assert missing == [], f"named in {doc.name} but not defined: " + ", ".join(missing)
