import sys

from dpt.cli import main

sys.exit(main())
