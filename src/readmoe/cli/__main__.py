import sys

from readmoe.cli import main

sys.exit(main())
