"""`python -m agent` is the same CLI as `airflow-agent`."""

import sys

from agent.cli import main

sys.exit(main())
