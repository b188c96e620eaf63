"""The agent's view of its node's VirtualMachine objects, fed by the watch and by our own writes."""

from __future__ import annotations

Key = tuple[str, str]  # (namespace, name)


def key_of(obj: dict) -> Key:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def _rv(obj: dict) -> int | None:
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, ValueError):
        return None


class VMStore:
    def __init__(self) -> None:
        self._objects: dict[Key, dict] = {}
        self._by_uid: dict[str, Key] = {}

    def put(self, obj: dict) -> None:
        """Keep the newest version: a late watch event never overwrites what we wrote since."""
        key = key_of(obj)
        old = self._objects.get(key)
        if old is not None and old["metadata"].get("uid") == obj["metadata"].get("uid"):
            new_rv, old_rv = _rv(obj), _rv(old)
            if new_rv is not None and old_rv is not None and new_rv < old_rv:
                return
        self._objects[key] = obj
        self._by_uid[obj["metadata"]["uid"]] = key

    def remove(self, obj: dict) -> None:
        key = key_of(obj)
        current = self._objects.get(key)
        if current is not None and current["metadata"].get("uid") == obj["metadata"].get("uid"):
            del self._objects[key]
            self._by_uid.pop(obj["metadata"]["uid"], None)

    def get(self, key: Key) -> dict | None:
        return self._objects.get(key)

    def key_for_uid(self, uid: str) -> Key | None:
        return self._by_uid.get(uid)

    def all_keys(self) -> list[Key]:
        return list(self._objects)
