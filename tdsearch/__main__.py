import sys

from tdsearch.cli import main

sys.exit(main())
