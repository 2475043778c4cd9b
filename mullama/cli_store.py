"""``mullama pull / list / rm``: the model store (:mod:`mullama.store`) on the command line.

Errors are raised, not printed: ``mullama.cli.main`` turns them into
``mullama: error: ...`` and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``pull``, ``list`` and ``rm`` sub-commands to ``sub``."""
    p = sub.add_parser("pull", help="download a model into the store")
    p.add_argument("name", metavar="NAME|URL",
                   help="gemma3:270m, an alias such as llama3.2:1b, hf:OWNER/REPO/FILE.gguf or a URL")
    p.add_argument("--sha256", metavar="HEX", help="expected sha256 of the file")
    p.add_argument("--force", action="store_true", help="download again even when present")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds without data before the download counts as stalled (default 30)")
    p.set_defaults(func=_pull)

    p = sub.add_parser("list", help="list the models in the store")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.set_defaults(func=_list)

    p = sub.add_parser("rm", help="delete a model from the store")
    p.add_argument("name", metavar="NAME", help="a store name or file name, as `mullama list` shows")
    p.set_defaults(func=_rm)


def _pull(args: argparse.Namespace) -> int:
    from mullama.pull import DEFAULT_TIMEOUT, pull

    timeout = DEFAULT_TIMEOUT if args.timeout is None else args.timeout
    print(pull(args.name, sha256=args.sha256, force=args.force, timeout=timeout))
    return 0


def _list(args: argparse.Namespace) -> int:
    from mullama import store

    records = store.list_models()
    if args.json:
        print(json.dumps([r.as_dict() for r in records], indent=2))
        return 0
    if not records:
        print(f"no models in {store.models_dir()}; run: mullama pull NAME", file=sys.stderr)
        return 0
    rows = [("NAME", "SIZE", "QUANT", "PATH")]
    rows += [(r.name, human_size(r.size), r.quantization or "?", str(r.path)) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return 0


def _rm(args: argparse.Namespace) -> int:
    from mullama import store

    print(f"removed {store.remove(args.name)}")
    return 0


def human_size(n: int) -> str:
    """``n`` bytes in decimal units, e.g. ``253.4 MB``."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
