"""The node agent: applies desired VM state to this node's libvirtd and reports it back."""
