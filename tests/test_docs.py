"""The documentation keeps up with the code."""

import re
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.test import override_settings

from ormbridge.conf import settings

pytestmark = pytest.mark.unit

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


def asgi_py(doc: str, first_line: str) -> str:
    """The code block of ``docs/<doc>`` that begins with ``first_line``."""
    text = (DOCS / doc).read_text()
    start = text.index(f"```python\n{first_line}\n") + len("```python\n")
    return text[start : text.index("```", start)]


async def get(application, path: str) -> tuple[int, bytes]:
    """The status and body of a GET of ``path`` from an ASGI application."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", b"localhost")], "server": ("localhost", 80),
             "client": ("127.0.0.1", 50000)}  # fmt: skip
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await communicator.receive_output(10)
    body = b""
    while True:
        message = await communicator.receive_output(10)
        body += message.get("body", b"")
        if not message.get("more_body"):
            return start["status"], body


@pytest.mark.parametrize(
    ("doc", "first_line"),
    [("install.md", "# proj/asgi.py"), ("channels.md", "# myproject/asgi.py")],
)
def test_the_documented_asgi_py_serves_ormbridge_js_in_debug(doc, first_line):
    """Followed together, install.md (section 7) and channels.md give pages their script:
    each ``asgi.py`` they show serves ``/static/ormbridge/ormbridge.js`` while DEBUG is on."""
    namespace: dict = {}
    with override_settings(DEBUG=True, STATIC_URL="/static/", ALLOWED_HOSTS=["localhost"]):
        exec(compile(asgi_py(doc, first_line), f"docs/{doc}", "exec"), namespace)
        application = namespace["application"]
        status, body = async_to_sync(get)(application, "/static/ormbridge/ormbridge.js")
    assert status == 200
    assert body == (ROOT / "ormbridge/static/ormbridge/ormbridge.js").read_bytes()
