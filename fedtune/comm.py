"""Byte accounting: what a Flower message costs on the wire."""

from __future__ import annotations

from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects


def wire_bytes(obj: InflatableObject) -> int:
    """Bytes Flower transmits for a Message (or record): every object in its tree, deflated.

    Flower 1.4x ships a message as content-addressed objects (message, record dict,
    records, array chunks), each serialized with a small header; this sums their sizes.
    gRPC/HTTP2 framing and TLS come on top and are not counted.
    """
    return sum(len(node.deflate()) for node in get_all_nested_objects(obj).values())
