"""``python -m stl_compiler.cli``: the ``stl-compiler`` command."""

import sys

from . import main

sys.exit(main())
