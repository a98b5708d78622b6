"""``python -m app`` is the ``sessiongate`` command."""

from .cli import main

raise SystemExit(main())
