"""The upstream side: llama-server processes, their supervision, the proxy client, admission."""
