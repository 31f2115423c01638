"""``python -m kvd``: the same as the ``kvd`` console script."""

from kvd.cli import main

raise SystemExit(main())
