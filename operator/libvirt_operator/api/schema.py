"""Turn a pydantic model's JSON Schema into a Kubernetes structural OpenAPI v3 schema."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

# JSON Schema keywords a structural schema may carry.
_KEEP = {
    "type", "properties", "required", "items", "enum", "default", "description", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "pattern", "minItems", "maxItems", "minProperties", "maxProperties", "additionalProperties",
    "nullable", "uniqueItems", "multipleOf",
}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs)


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "$ref" in node:
        ref = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**copy.deepcopy(ref), **node}  # field-level keys (default, description) win
    if "anyOf" in node:  # Optional[X] -> X; the field is simply not required
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unions other than Optional are not structural: {options}")
        node = {**_convert(options[0], defs), **{k: v for k, v in node.items() if k != "default"}}
        if node.get("default", "absent") is None:
            node.pop("default")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            out[key] = value
        elif key == "properties":
            out[key] = {name: _convert(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict):  # a map; `false` is implied (unknown fields are pruned)
                out[key] = _convert(value, defs)
        elif key in _KEEP:
            out[key] = value
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("default", "absent") is None:
        out.pop("default")
    return out
