"""libvirt's memory units (the ``unit`` attribute) to KiB, libvirt's default unit."""

_FACTORS = {
    "b": 1, "bytes": 1,
    "KB": 10**3, "k": 2**10, "KiB": 2**10,
    "MB": 10**6, "M": 2**20, "MiB": 2**20,
    "GB": 10**9, "G": 2**30, "GiB": 2**30,
    "TB": 10**12, "T": 2**40, "TiB": 2**40,
    "PB": 10**15, "P": 2**50, "PiB": 2**50,
    "EB": 10**18, "E": 2**60, "EiB": 2**60,
}


def to_kib(value: int, unit: str | None) -> int:
    """``value`` in ``unit`` (None means KiB) as KiB, rounded up as libvirt does."""
    factor = _FACTORS.get(unit or "KiB")
    if factor is None:
        raise ValueError(f"unknown memory unit {unit!r}")
    return -(-value * factor // 1024)
