"""The documentation keeps up with the code."""

import re
from pathlib import Path

from ormbridge.conf import settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_every_setting_is_documented_with_its_default():
    text = (DOCS / "settings.md").read_text()
    for name in settings.names():
        default = type(settings).__dict__[name].default
        assert f"| `{name}` | `{default!r}` |" in text, name


def test_the_docs_and_the_reference_celeryconfig_name_only_current_settings():
    """``ORMBRIDGE["KEY"]`` in the README, the docs or celeryconfig.py is a key ormbridge reads
    (a removed key there sends a reader to a setting that ``check`` calls unknown: W001)."""
    named = re.compile(r"""ORMBRIDGE\[["']([A-Z0-9_]+)["']\]""")
    files = [ROOT / "README.md", ROOT / "celeryconfig.py", *sorted(DOCS.glob("*.md"))]
    unknown = {
        (path.relative_to(ROOT).as_posix(), key)
        for path in files
        for key in named.findall(path.read_text())
        if key not in settings.names()
    }
    assert not unknown
