"""MCP both ways: AI Lab as a client of MCP servers (client.py) and as one (server.py)."""
