"""Live updates: bring a running domain to its spec without a restart.

``plan`` (pure) compares the desired domain with the live and the stored one and
lists the steps; ``apply`` carries them out through named Guest methods.
"""
