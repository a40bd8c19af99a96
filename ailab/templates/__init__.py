"""Chat templates bundled with AI Lab, read as package data (importlib.resources)."""
