"""`python -m align ...` (also `accelerate launch -m align sft ...` and `torchrun -m align ...`)."""

import sys

from align.cli import main

sys.exit(main())
