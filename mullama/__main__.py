"""``python -m mullama`` is the ``mullama`` command."""

from mullama.cli import main

raise SystemExit(main())
