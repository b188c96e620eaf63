"""A small declarative layer over ElementTree for libvirt XML.

An ``XMLElement`` subclass wraps one ElementTree element; class-level
descriptors map Python properties onto attributes, child text and child
elements, addressed by a ``/``-separated path of child tags relative to the
wrapped element. Everything a class does not model stays in the tree, so
parse -> modify -> serialize keeps whatever libvirt wrote.
"""

from __future__ import annotations

import copy
import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Generic, Self, TypeVar

from libvirt_operator.domain import units

T = TypeVar("T", bound="XMLElement")


def parse_element(text: str) -> ET.Element:
    """Parses XML text, keeping the document's namespace prefixes for serialization."""
    events = ET.iterparse(io.StringIO(text), events=("start-ns",))
    for _event, (prefix, uri) in events:
        # ElementTree keeps prefixes in one global map; ns0-style names are reserved.
        if prefix and not re.fullmatch(r"ns\d+", prefix):
            ET.register_namespace(prefix, uri)
    return events.root


def canonical_xml(text_or_element: str | ET.Element) -> str:
    """C14N 2.0 form, whitespace-only text dropped: equal iff the documents mean the same."""
    text = text_or_element if isinstance(text_or_element, str) else ET.tostring(text_or_element, "unicode")
    return ET.canonicalize(text, strip_text=True)


def split_path(path: str | None) -> list[str]:
    """Path steps; a step may be a namespaced tag ('{uri}tag', whose uri has slashes)."""
    return re.findall(r"(?:\{[^}]*\})?[^/{}]+", path) if path else []


class XMLElement:
    """Base of all element classes: ``TAG`` names the element, ``CHILD_ORDER``
    lists direct child tags in the order libvirt writes them (new children are
    inserted accordingly; unknown tags go last)."""

    TAG: ClassVar[str]
    CHILD_ORDER: ClassVar[tuple[str, ...]] = ()

    def __init__(self, element: ET.Element | None = None, **props: Any) -> None:
        if element is None:
            element = ET.Element(self.TAG)
        elif element.tag != self.TAG:
            raise ValueError(f"{type(self).__name__} wraps <{self.TAG}>, not <{element.tag}>")
        self.element = element
        for key, value in props.items():
            if not isinstance(getattr(type(self), key, None), _Descriptor):
                raise TypeError(f"{type(self).__name__} has no XML property {key!r}")
            setattr(self, key, value)

    @classmethod
    def from_xml(cls, text: str) -> Self:
        return cls(parse_element(text))

    def to_xml(self) -> str:
        tree = copy.deepcopy(self.element)
        ET.indent(tree, space="  ")
        return ET.tostring(tree, encoding="unicode") + "\n"

    def __eq__(self, other: object) -> bool:
        # Two wrappers are equal when they wrap the very same element.
        return isinstance(other, XMLElement) and other.element is self.element

    def __hash__(self) -> int:
        return id(self.element)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {ET.tostring(self.element, 'unicode')[:120]!r}>"

    # --- tree helpers used by the descriptors ---------------------------------

    def _find(self, path: str | None) -> ET.Element | None:
        return self.element if not path else self.element.find(path)

    def _ensure(self, path: str | None) -> ET.Element:
        """The element at path, creating missing steps (the first one in CHILD_ORDER)."""
        node = self.element
        for depth, tag in enumerate(split_path(path)):
            found = node.find(tag)
            if found is None:
                found = ET.Element(tag)
                _insert_ordered(node, found, self.CHILD_ORDER if depth == 0 else ())
            node = found
        return node

    def _prune(self, path: str | None) -> None:
        """Removes the elements along path (deepest first) that became empty."""
        steps = split_path(path)
        while steps:
            node = self.element.find("/".join(steps))
            parent = self.element.find("/".join(steps[:-1])) if len(steps) > 1 else self.element
            if node is None or len(node) or node.attrib or (node.text or "").strip():
                return
            parent.remove(node)
            steps.pop()

    def _insert_child(self, child: ET.Element, container_path: str | None) -> None:
        container = self._ensure(container_path)
        order = self.CHILD_ORDER if container is self.element else ()
        same = [i for i, el in enumerate(container) if el.tag == child.tag]
        if same:  # keep a family together: after its last member
            container.insert(same[-1] + 1, child)
        else:
            _insert_ordered(container, child, order)


def _insert_ordered(parent: ET.Element, child: ET.Element, order: tuple[str, ...]) -> None:
    if child.tag in order:
        rank = order.index(child.tag)
        for i, sibling in enumerate(parent):
            if sibling.tag in order and order.index(sibling.tag) > rank:
                parent.insert(i, child)
                return
    parent.append(child)


# --- descriptors -----------------------------------------------------------------


class _Descriptor:
    """Maps a Python value to XML text; subclasses override decode/encode for typed values."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def decode(self, raw: str) -> Any:
        return raw

    def encode(self, value: Any) -> str:
        return str(value)


class Attr(_Descriptor):
    """An attribute of the element at ``path`` (the wrapped element itself by default).
    Setting None removes it, and with it path elements left empty."""

    def __init__(self, attr: str, path: str | None = None) -> None:
        self.attr, self.path = attr, path

    def __get__(self, obj: XMLElement | None, owner: type) -> Any:
        if obj is None:
            return self
        node = obj._find(self.path)
        raw = None if node is None else node.get(self.attr)
        return None if raw is None else self.decode(raw)

    def __set__(self, obj: XMLElement, value: Any) -> None:
        if value is None:
            node = obj._find(self.path)
            if node is not None and self.attr in node.attrib:
                del node.attrib[self.attr]
                obj._prune(self.path)
            return
        obj._ensure(self.path).set(self.attr, self.encode(value))


class IntAttr(Attr):
    def decode(self, raw: str) -> int:
        return int(raw, 0)  # libvirt writes PCI addresses in hex ('0x1f')


class BoolAttr(Attr):
    """A two-word boolean attribute: yes/no by default, or e.g. on/off."""

    def __init__(self, attr: str, path: str | None = None, true: str = "yes", false: str = "no") -> None:
        super().__init__(attr, path)
        self.true, self.false = true, false

    def decode(self, raw: str) -> bool:
        if raw not in (self.true, self.false):
            raise ValueError(f"{self.attr}={raw!r}: expected {self.true!r} or {self.false!r}")
        return raw == self.true

    def encode(self, value: bool) -> str:
        return self.true if value else self.false


class KiBAttr(Attr):
    """A memory size attribute with its unit in a sibling attribute; read and written in KiB."""

    def __init__(self, attr: str, path: str | None = None, unit_attr: str = "unit") -> None:
        super().__init__(attr, path)
        self.unit_attr = unit_attr

    def __get__(self, obj: XMLElement | None, owner: type) -> Any:
        if obj is None:
            return self
        node = obj._find(self.path)
        if node is None or node.get(self.attr) is None:
            return None
        return units.to_kib(int(node.get(self.attr)), node.get(self.unit_attr))

    def __set__(self, obj: XMLElement, value: int | None) -> None:
        super().__set__(obj, value)
        node = obj._find(self.path)
        if node is not None and value is not None:
            node.set(self.unit_attr, "KiB")
        elif node is not None:
            node.attrib.pop(self.unit_attr, None)
            obj._prune(self.path)


class Text(_Descriptor):
    """The text of the element at ``path``; setting None removes that element."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __get__(self, obj: XMLElement | None, owner: type) -> Any:
        if obj is None:
            return self
        node = obj._find(self.path)
        return None if node is None or node.text is None else self.decode(node.text.strip())

    def __set__(self, obj: XMLElement, value: Any) -> None:
        if value is None:
            _remove(obj, self.path)
        else:
            obj._ensure(self.path).text = self.encode(value)


class IntText(Text):
    def decode(self, raw: str) -> int:
        return int(raw)


class KiBText(Text):
    """``<memory unit='MiB'>512</memory>`` style sizes, read and written in KiB."""

    def __get__(self, obj: XMLElement | None, owner: type) -> Any:
        if obj is None:
            return self
        node = obj._find(self.path)
        if node is None or node.text is None:
            return None
        return units.to_kib(int(node.text.strip()), node.get("unit"))

    def __set__(self, obj: XMLElement, value: int | None) -> None:
        super().__set__(obj, value)
        if value is not None:
            obj._ensure(self.path).set("unit", "KiB")


class Flag(_Descriptor):
    """Presence of a (usually empty) child element: ``<readonly/>``, ``<acpi/>``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __get__(self, obj: XMLElement | None, owner: type) -> Any:
        if obj is None:
            return self
        return obj._find(self.path) is not None

    def __set__(self, obj: XMLElement, value: bool) -> None:
        if value:
            obj._ensure(self.path)
        else:
            _remove(obj, self.path)


def _remove(obj: XMLElement, path: str) -> None:
    *parent_steps, tag = split_path(path)
    parent_path = "/".join(parent_steps) or None
    parent = obj._find(parent_path)
    node = None if parent is None else parent.find(tag)
    if node is not None:
        parent.remove(node)
        obj._prune(parent_path)


class Child(_Descriptor, Generic[T]):
    """One child element wrapped by ``cls``, found under ``path`` (default: directly).
    None when absent; assigning an instance inserts (or replaces) it; None removes it."""

    def __init__(self, cls: type[T], path: str | None = None) -> None:
        self.cls, self.path = cls, path

    def _location(self) -> str:
        return f"{self.path}/{self.cls.TAG}" if self.path else self.cls.TAG

    def __get__(self, obj: XMLElement | None, owner: type) -> Any:
        if obj is None:
            return self
        node = obj._find(self._location())
        return None if node is None else self.cls(node)

    def __set__(self, obj: XMLElement, value: T | None) -> None:
        old = obj._find(self._location())
        if value is None:
            if old is not None:
                _remove(obj, self._location())
            return
        if old is not None:
            container = obj._find(self.path)
            container[list(container).index(old)] = value.element
        else:
            obj._insert_child(value.element, self.path)


class Children(_Descriptor, Generic[T]):
    """All children wrapped by ``cls`` under ``path``, as a live list view."""

    def __init__(self, cls: type[T], path: str | None = None) -> None:
        self.cls, self.path = cls, path

    def __get__(self, obj: XMLElement | None, owner: type) -> Any:
        if obj is None:
            return self
        return ChildList(obj, self.cls, self.path)

    def __set__(self, obj: XMLElement, items: list[T]) -> None:
        view = ChildList(obj, self.cls, self.path)
        view.clear()
        for item in items:
            view.append(item)


class ChildList(Generic[T]):
    """A view of one family of children; changes go straight into the tree."""

    def __init__(self, owner: XMLElement, cls: type[T], path: str | None) -> None:
        self.owner, self.cls, self.path = owner, cls, path

    def _nodes(self) -> list[ET.Element]:
        container = self.owner._find(self.path)
        return [] if container is None else container.findall(self.cls.TAG)

    def __iter__(self) -> Iterator[T]:
        return (self.cls(node) for node in self._nodes())

    def __len__(self) -> int:
        return len(self._nodes())

    def __getitem__(self, index: int) -> T:
        return self.cls(self._nodes()[index])

    def __bool__(self) -> bool:
        return bool(self._nodes())

    def find(self, predicate: Callable[[T], bool]) -> T | None:
        return next((item for item in self if predicate(item)), None)

    def append(self, item: T) -> T:
        self.owner._insert_child(item.element, self.path)
        return item

    def remove(self, item: T) -> None:
        container = self.owner._find(self.path)
        if container is None or item.element not in list(container):
            raise ValueError(f"{item!r} is not a child here")
        container.remove(item.element)

    def clear(self) -> None:
        for item in list(self):
            self.remove(item)
