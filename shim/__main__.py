"""`python -m kybernate.shim`: the same entry point as the installed shim binary.

`start` re-executes the interpreter this way for the long-lived `serve` process, so
nothing depends on files beside the (possibly copied) shim binary.
"""

import sys

from kybernate.shim.main import main

sys.exit(main())
