"""`python -m r4b_edge.train <stage> ...` (also under torchrun -m)."""
import sys

from .cli import main

sys.exit(main())
