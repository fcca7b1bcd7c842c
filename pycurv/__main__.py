"""``python -m pycurv`` is the ``pycurv`` command."""

import sys

from .cli import main

sys.exit(main())
