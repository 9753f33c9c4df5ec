"""``python -m backends.simulator``: see ``cli.py``."""

from .cli import main

raise SystemExit(main())
