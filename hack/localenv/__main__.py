"""Entry point of `python -m localenv`."""

from localenv.cli import main

raise SystemExit(main())
