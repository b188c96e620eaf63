"""Base model and shared field types for all resources."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from libvirt_operator.api import quantity


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True
    )

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(rule: str, message: str, reason: str | None = None, field_path: str | None = None) -> dict:
    """One x-kubernetes-validations entry."""
    entry: dict[str, str] = {"rule": rule, "message": message}
    if reason:
        entry["reason"] = reason
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def validations(*rules: dict) -> dict:
    return {"x-kubernetes-validations": list(rules)}


# A Kubernetes resource.Quantity written as a string ("256Mi", "2Gi").
Quantity = Annotated[str, Field(pattern=quantity.PATTERN, max_length=32)]

# A lower-case DNS label: names of disks, interfaces.
DnsLabel = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", min_length=1, max_length=63)]

# An absolute host path (confined by the agent to its storage roots).
HostPath = Annotated[str, Field(pattern=r"^/", min_length=2, max_length=4096)]

# The id of a one-shot request: a new id means "do it once more".
RequestId = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([-_.A-Za-z0-9]*)$")]


def utcnow() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Condition(ApiModel):
    """A Kubernetes-style status condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: str
    observed_generation: int | None = Field(None, ge=0)


# Schema extras: an object field whose defaults apply even when the user omits it,
# and a list of objects keyed by name (merged by name under server-side apply).
NESTED_DEFAULT = {"default": {}}
NAMED_LIST = {"default": [], "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}
CONDITIONS_LIST = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
