import os
import signal
import sys

if os.environ.get("LAMBDA_SEARCH_SUPERVISED"):
    # a worker process a search started: a Ctrl-C in the terminal reaches it too, but its search
    # stops it (SIGTERM); until its own handlers are set (it is still importing), it ignores SIGINT
    signal.signal(signal.SIGINT, signal.SIG_IGN)

from .cli import main  # noqa: E402

sys.exit(main())
