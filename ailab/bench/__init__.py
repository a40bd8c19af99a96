"""Speed measurement: the loaded model's speed and the gateway against a bare llama-server."""
