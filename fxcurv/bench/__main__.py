"""``python -m fxcurv.bench``."""
import sys

from .cli import main

sys.exit(main())
