"""``python -m sessiongate.gateway`` is the ``sessiongate`` command."""

from .cli import main

raise SystemExit(main())
