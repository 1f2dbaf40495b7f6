"""Which metadata contexts a LIST or SET_META_CONTEXT query names, by QEMU's rules.

A LIST with no query lists everything the export offers; a query that ends in ``:``
(``base:``, ``qemu:``, ``qemu:dirty-bitmap:``) lists every context under that prefix;
any other query names one context exactly. SET selects exact names only. Results keep
the export's own order, whatever order the queries came in.
"""

from __future__ import annotations

from collections.abc import Sequence


def list_contexts(available: Sequence[str], queries: Sequence[str]) -> list[str]:
    """Contexts that NBD_OPT_LIST_META_CONTEXT answers with."""
    if not queries:
        return list(available)
    wanted = set()
    for query in queries:
        if query.endswith(":"):
            wanted.update(name for name in available if name.startswith(query))
        elif query in available:
            wanted.add(query)
    return [name for name in available if name in wanted]


def select_contexts(available: Sequence[str], queries: Sequence[str]) -> list[str]:
    """Contexts that NBD_OPT_SET_META_CONTEXT selects: exact names only."""
    wanted = set(queries)
    return [name for name in available if name in wanted]
