"""Errors of the domain layer."""


class RenderError(ValueError):
    """A spec that passes API validation but cannot become a libvirt domain."""
