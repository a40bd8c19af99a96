"""The HTTP layer: FastAPI routes and the pydantic models of every request and response."""
