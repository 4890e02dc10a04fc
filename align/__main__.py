"""`python -m align ...` (also `accelerate launch -m align sft ...` and `torchrun -m align ...`)."""

import sys

from align.cli.main import main

sys.exit(main())
