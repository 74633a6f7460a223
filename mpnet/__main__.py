"""``python -m mpnet`` is the ``mpnet`` command."""

from .cli import main

raise SystemExit(main())
