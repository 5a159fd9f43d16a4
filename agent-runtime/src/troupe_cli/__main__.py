"""``python -m troupe_cli``: the ``troupe`` command where the script is not on PATH."""

from troupe_cli.main import main

raise SystemExit(main())
