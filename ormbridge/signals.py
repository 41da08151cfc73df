"""ormbridge's own bulk signals, sent by the ``safe_bulk_*`` helpers once per chunk.

Every signal is sent with ``sender`` (the model class), ``pks`` (list of the
chunk's primary keys), ``fields`` (frozenset of changed field names; empty for
deletes and creates) and ``using`` (the database alias). ``pre_*`` signals are
sent inside the chunk's transaction, before its write; ``post_*`` signals after
the chunk committed. Plain ORM calls never send them.
"""

from django.dispatch import Signal

pre_bulk_update = Signal()
post_bulk_update = Signal()
pre_bulk_delete = Signal()
post_bulk_delete = Signal()
post_bulk_create = Signal()

__all__ = [
    "post_bulk_create",
    "post_bulk_delete",
    "post_bulk_update",
    "pre_bulk_delete",
    "pre_bulk_update",
]
