"""The agent loop: a chat turn with tool calls, approvals and the token budget."""
