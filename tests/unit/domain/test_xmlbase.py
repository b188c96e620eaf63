"""The declarative base on small toy elements."""

import xml.etree.ElementTree as ET

import pytest

from libvirt_operator.domain.xmlbase import (
    Attr,
    BoolAttr,
    Child,
    Children,
    Flag,
    IntAttr,
    IntText,
    KiBAttr,
    KiBText,
    Text,
    XMLElement,
    canonical_xml,
    parse_element,
)

NS = "https://example.org/toy"


class Leaf(XMLElement):
    TAG = "leaf"
    name = Attr("name")


class Note(XMLElement):
    TAG = f"{{{NS}}}note"
    text = Text(f"{{{NS}}}text")


class Toy(XMLElement):
    TAG = "toy"
    CHILD_ORDER = ("name", "size", "source", "flag", "leaf", "holder")

    kind = Attr("kind")
    count = IntAttr("count")
    enabled = BoolAttr("enabled")
    appended = BoolAttr("append", path="source/log", true="on", false="off")
    source_file = Attr("file", path="source")
    name = Text("name")
    size = KiBText("size")
    cell_size = KiBAttr("memory", path="cell")
    number = IntText("number")
    flag = Flag("flag")
    leaves = Children(Leaf)
    first_leaf = Child(Leaf)
    notes = Children(Note, path="holder")


def same(a: str, b: str) -> bool:
    return canonical_xml(a) == canonical_xml(b)


def test_attributes_read_typed_values():
    toy = Toy.from_xml("<toy kind='a' count='0x1f' enabled='yes'><source file='/f'><log append='off'/></source></toy>")
    assert (toy.kind, toy.count, toy.enabled, toy.appended, toy.source_file) == ("a", 31, True, False, "/f")


def test_absent_values_are_none_or_false():
    toy = Toy.from_xml("<toy/>")
    assert (toy.kind, toy.count, toy.enabled, toy.source_file, toy.name, toy.size) == (None,) * 6
    assert toy.flag is False and len(toy.leaves) == 0 and toy.first_leaf is None


def test_bool_attr_rejects_other_words():
    with pytest.raises(ValueError, match="expected 'yes' or 'no'"):
        _ = Toy.from_xml("<toy enabled='on'/>").enabled


def test_setting_a_path_attribute_creates_the_path_in_order():
    toy = Toy.from_xml("<toy><name>n</name><leaf name='x'/></toy>")
    toy.source_file = "/img"
    toy.appended = True
    expected = "<toy><name>n</name><source file='/img'><log append='on'/></source><leaf name='x'/></toy>"
    assert same(toy.to_xml(), expected)


def test_setting_none_removes_the_attribute_and_empty_path_elements():
    toy = Toy.from_xml("<toy><source file='/img' index='1'><log append='on'/></source></toy>")
    toy.appended = None
    assert same(toy.to_xml(), "<toy><source file='/img' index='1'/></toy>")
    toy.source_file = None  # <source> keeps index=, so it stays
    assert same(toy.to_xml(), "<toy><source index='1'/></toy>")


def test_setting_none_drops_a_path_left_empty():
    toy = Toy.from_xml("<toy><source file='/img'/></toy>")
    toy.source_file = None
    assert same(toy.to_xml(), "<toy/>")


def test_text_and_flag():
    toy = Toy.from_xml("<toy><flag/></toy>")
    toy.name, toy.number, toy.flag = "n", 5, False
    assert same(toy.to_xml(), "<toy><name>n</name><number>5</number></toy>")
    assert toy.number == 5
    toy.name = None
    assert same(toy.to_xml(), "<toy><number>5</number></toy>")


@pytest.mark.parametrize(
    ("xml", "kib"),
    [
        ("<size>2048</size>", 2048),  # no unit: KiB
        ("<size unit='MiB'>512</size>", 512 * 1024),
        ("<size unit='G'>1</size>", 1024 * 1024),
        ("<size unit='KB'>1000</size>", 977),  # 10**6 bytes, rounded up
        ("<size unit='b'>1</size>", 1),
    ],
)
def test_kib_text_converts_units(xml, kib):
    assert Toy.from_xml(f"<toy>{xml}</toy>").size == kib


def test_kib_values_are_written_in_kib():
    toy = Toy.from_xml("<toy><size unit='MiB'>1</size></toy>")
    toy.size = 4096
    toy.cell_size = 8
    assert same(toy.to_xml(), "<toy><size unit='KiB'>4096</size><cell memory='8' unit='KiB'/></toy>")
    assert Toy.from_xml("<toy><cell memory='2' unit='MiB'/></toy>").cell_size == 2048


def test_unknown_unit_is_an_error():
    with pytest.raises(ValueError, match="unknown memory unit"):
        _ = Toy.from_xml("<toy><size unit='parsecs'>1</size></toy>").size


def test_children_append_after_their_family_and_remove():
    toy = Toy.from_xml("<toy><name>n</name><leaf name='a'/><holder/></toy>")
    toy.leaves.append(Leaf(name="b"))
    assert [leaf.name for leaf in toy.leaves] == ["a", "b"]
    assert same(toy.to_xml(), "<toy><name>n</name><leaf name='a'/><leaf name='b'/><holder/></toy>")
    toy.leaves.remove(toy.leaves[0])
    assert same(toy.to_xml(), "<toy><name>n</name><leaf name='b'/><holder/></toy>")


def test_first_child_of_a_family_goes_by_child_order():
    toy = Toy.from_xml("<toy><holder/><name>n</name></toy>")
    toy.flag = True
    toy.leaves.append(Leaf(name="a"))
    assert same(toy.to_xml(), "<toy><flag/><leaf name='a'/><holder/><name>n</name></toy>")


def test_child_set_replace_remove():
    toy = Toy.from_xml("<toy><leaf name='a'/><unknown/></toy>")
    assert toy.first_leaf.name == "a"
    toy.first_leaf = Leaf(name="z")
    assert same(toy.to_xml(), "<toy><leaf name='z'/><unknown/></toy>")
    toy.first_leaf = None
    assert same(toy.to_xml(), "<toy><unknown/></toy>")


def test_children_under_a_namespaced_path():
    toy = Toy()
    toy.notes.append(Note(text="hello"))
    assert toy.notes[0].text == "hello"
    expected = f"<toy><holder><n:note xmlns:n='{NS}'><n:text>hello</n:text></n:note></holder></toy>"
    # the prefix of an unregistered namespace is ElementTree's choice (ns0)
    assert ET.canonicalize(toy.to_xml(), strip_text=True, rewrite_prefixes=True) == ET.canonicalize(
        expected, strip_text=True, rewrite_prefixes=True
    )


def test_unmodelled_content_survives_changes():
    text = "<toy extra='1'><name>n</name><mystery a='b'>text<inner/></mystery><leaf name='a' z='9'/></toy>"
    toy = Toy.from_xml(text)
    toy.kind = "k"
    assert same(toy.to_xml(), text.replace("<toy extra='1'>", "<toy extra='1' kind='k'>"))


def test_keyword_arguments_must_be_properties():
    with pytest.raises(TypeError, match="no XML property 'bogus'"):
        Toy(bogus=1)


def test_wrapping_the_wrong_element_is_refused():
    with pytest.raises(ValueError, match="wraps <toy>"):
        Toy(parse_element("<other/>"))


def test_document_prefixes_are_kept():
    text = "<toy xmlns:custom='https://example.org/c'><custom:thing/></toy>"
    assert "custom:thing" in Toy.from_xml(text).to_xml()


def test_canonical_comparison_sees_differences():
    assert same("<a x='1'><b/></a>", "<a  x=\"1\">\n  <b></b>\n</a>")
    assert not same("<a x='1'><b/></a>", "<a x='2'><b/></a>")
    assert not same("<a><b/><c/></a>", "<a><c/><b/></a>")
