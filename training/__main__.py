"""`python -m onestep_sr.training CONFIG.yaml` - the entry point `accelerate launch -m` needs."""

import sys

from .cli import main

sys.exit(main())
