"""The failures a tool reports to the model as its result: ToolError and SandboxError."""


class ToolError(Exception):
    """An expected failure; its message goes to the model as the error."""


class SandboxError(ToolError):
    """A path or address the sandbox refuses."""
