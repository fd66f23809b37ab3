"""``python -m mail2alert``: the same as the ``mail2alert`` console script."""

from mail2alert.cli import main

raise SystemExit(main())
