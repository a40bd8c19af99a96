"""Entry point: `python ai_client.py` starts the terminal client (the code is ailab.client)."""

import sys

from ailab.client import main

if __name__ == "__main__":
    sys.exit(main())
