"""AI Lab: a private assistant's gateway in front of llama.cpp's llama-server."""
