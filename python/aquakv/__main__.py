"""`python -m aquakv ...` runs the `aquakv` command line."""
import sys

from aquakv.cli import main

sys.exit(main())
