"""``python -m troupe_runtime.cli``: the ``troupe`` command where the script is not on PATH."""

from troupe_runtime.cli.main import main

raise SystemExit(main())
