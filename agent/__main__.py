"""`python -m kybernate.agent [flags]`: the node agent in the foreground."""

import sys

from kybernate.agent.main import agent_main

sys.exit(agent_main(sys.argv[1:]))
