"""``python -m amaml``: the ``amaml`` command line."""

from .cli import main

raise SystemExit(main())
