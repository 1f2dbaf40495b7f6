import sys

from nbdtrack.cli import main

sys.exit(main())
