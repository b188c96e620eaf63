"""Command-line tools for users of the operator (the `kubectl virsh` plugin)."""
