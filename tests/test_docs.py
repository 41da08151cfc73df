"""The documentation keeps up with the code."""

from pathlib import Path

import pytest

from ormbridge.conf import settings

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_setting_is_documented_with_its_default():
    text = (DOCS / "settings.md").read_text()
    for name in settings.names():
        default = type(settings).__dict__[name].default
        assert f"| `{name}` | `{default!r}` |" in text, name
