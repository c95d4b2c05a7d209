"""``python -m pill``: the ``pill`` command."""
import sys

from .cli import main

sys.exit(main())
