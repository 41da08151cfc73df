"""The demo's reader process: reads one product through the cache, again and again.

``python -m shop.demo_reader <pk>`` (in ``example/``) prints one line per read,
``<start> <end> <stock>``, the times from ``time.time()`` (comparable across
processes), until it is stopped. The demo times its commits against these reads:
a reader in another process, with its own database and Redis connections, is what
"fresh at commit" has to hold for.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time


def main(pk: int) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example.settings")
    import django

    django.setup()
    from ormbridge.cache import cached_instance
    from shop.models import Product

    out = sys.stdout
    while True:
        start = time.time()
        stock = cached_instance(Product, pk).stock
        out.write(f"{start:.6f} {time.time():.6f} {stock}\n")
        out.flush()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        main(int(sys.argv[1]))
