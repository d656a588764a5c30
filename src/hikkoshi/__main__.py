"""`python -m hikkoshi`."""

import sys

from hikkoshi.cli.main import main

sys.exit(main())
