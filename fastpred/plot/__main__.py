import sys

from fastpred.plot.cli import main

sys.exit(main())
