import sys

from tuneoff.cli import main

sys.exit(main())
