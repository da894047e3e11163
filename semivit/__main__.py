import sys

from semivit.cli import main

sys.exit(main())
