import sys

from harmonia.app.cli import main

sys.exit(main())
