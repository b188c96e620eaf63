"""Kubernetes resource quantities ("256Mi", "1G", "1.5Gi") to bytes."""

from decimal import Decimal

PATTERN = r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"

_FACTORS = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def to_bytes(value: str | int) -> int:
    """Parse a quantity into an integer number of bytes (rounded up)."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    for suffix in sorted(_FACTORS, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            number, factor = text[: -len(suffix)], _FACTORS[suffix]
            break
    else:
        number, factor = text, 1
    try:
        amount = Decimal(number) * factor
    except ArithmeticError as exc:
        raise ValueError(f"not a quantity: {value!r}") from exc
    if amount < 0:
        raise ValueError(f"negative quantity: {value!r}")
    whole = int(amount)
    return whole if whole == amount else whole + 1


def to_kib(value: str | int) -> int:
    return -(-to_bytes(value) // 1024)
