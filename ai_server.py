"""Entry point: `python ai_server.py` serves AI Lab (the code is in ailab.api.app)."""

import sys

from ailab.api.app import main

if __name__ == "__main__":
    sys.exit(main())
