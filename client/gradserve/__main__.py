"""``python -m gradserve``: the ``gradserve`` command (``serve`` needs the server extra)."""
import sys

from gradserve.server.process.cli import main

sys.exit(main())
