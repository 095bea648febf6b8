"""`python -m kybernate` is the `kybernate` command."""

from kybernate.cli import main

raise SystemExit(main())
