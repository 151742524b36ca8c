"""`HeaderMap`, the one header representation shared by the host and the proxy, and the
proxy-wasm "pairs" wire format (reference section 4.1).

Names are stored lower-case (Envoy's `LowerCaseString`); HTTP/2-style pseudo-headers
(`:method`, `:path`, `:authority`, `:scheme`, `:status`) come first. Values are `str`; bytes that
are not UTF-8 survive a round trip through ``surrogateescape``.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Iterable, Iterator
from itertools import chain

MAX_PAIRS = 1024
MAX_PAIRS_BYTES = 1 << 20

_U32 = struct.Struct("<I")
_U32x2 = struct.Struct("<II")


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def utf8_len(text: str) -> int:
    """Bytes of `text` on the wire (an ASCII text, nearly every header, needs no encoding)."""
    return len(text) if text.isascii() else len(_enc(text))


_NAME = operator.itemgetter(0)

class HeaderMap:
    """An ordered multimap of lower-cased header names to values.

    Lookups go through a list of the names kept beside the entries (built on the first lookup,
    kept up to date by `add` and `set`, dropped by other changes), so that finding a name is
    `list.index` in C rather than a loop in Python: filters look names up many times a request.
    """

    __slots__ = ("_items", "_names", "_size", "writes")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(k.lower(), v) for k, v in items]
        self._names: list[str] | None = None
        """The names of `_items`, in order, once a lookup needed them; None until then."""
        self._size = -1
        """`byte_size()` once computed, kept up to date by `add` (a filter adding headers one by
        one is checked against its limit on every add); -1 after any other change."""
        self.writes = 0
        """Writes so far (add, set, remove, replace_all): how the proxy sees that a filter
        touched the map without copying it before each filter."""

    @classmethod
    def of_lowercase(cls, items: list[tuple[str, str]]) -> HeaderMap:
        """A map over `items`, taken as they are (not copied): names already lower-case and
        pseudo-headers in front, as the proxy's parsers produce them (no second pass per request)."""
        headers = cls.__new__(cls)
        headers._items = items
        headers._names = None
        headers._size = -1
        headers.writes = 0
        return headers

    def _index(self) -> list[str]:
        names = self._names
        if names is None:
            names = self._names = list(map(_NAME, self._items))  # in C, no Python per entry
        return names

    # -- reading -----------------------------------------------------------------------------
    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of `name` (Envoy's `get_header_map_value` returns only the first)."""
        name = name.lower()
        items = self._items
        if items and items[0][0] == name:
            return items[0][1]  # `:method`, `:status`: the proxy's own lookups
        names = self._index()
        if name in names:
            return items[names.index(name)][1]
        return default

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        names = self._index()
        if name not in names:
            return []
        return [v for k, v in self._items if k == name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index()

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeaderMap) and self._items == other._items

    def __repr__(self) -> str:
        return f"HeaderMap({self._items!r})"

    def byte_size(self) -> int:
        """Sum of name and value bytes: what Envoy reports as a map's size."""
        if self._size < 0:
            # UTF-8 is concatenative: the size of the joined text is the sum of the sizes, and an
            # ASCII text (nearly every header map) needs no encoding to be measured.
            text = "".join(chain.from_iterable(self._items))
            self._size = utf8_len(text)
        return self._size

    def regular(self) -> list[tuple[str, str]]:
        """The entries that are not pseudo-headers, in order."""
        return [(k, v) for k, v in self._items if not k.startswith(":")]

    # -- writing -----------------------------------------------------------------------------
    def add(self, name: str, value: str) -> None:
        self.writes += 1
        name = name.lower()
        if self._size >= 0:
            self._size += utf8_len(name + value)
        items = self._items
        names = self._names
        if name[:1] == ":":
            # Pseudo-headers stay in front, in arrival order.
            idx = 0
            while idx < len(items) and items[idx][0].startswith(":"):
                idx += 1
            items.insert(idx, (name, value))
            if names is not None:
                names.insert(idx, name)
        else:
            items.append((name, value))
            if names is not None:
                names.append(name)

    def set(self, name: str, value: str) -> None:
        """Replace every entry of `name` with one; keep the position of the first one."""
        name = name.lower()
        names = self._index()
        if name not in names:
            self.add(name, value)
            return
        self.writes += 1
        items = self._items
        i = names.index(name)
        old = items[i][1]
        items[i] = (name, value)
        if names.count(name) > 1:
            # Later entries of the name go (rare: a name that came more than once).
            items[i + 1 :] = [kv for kv in items[i + 1 :] if kv[0] != name]
            self._names = None
            self._size = -1
        elif self._size >= 0:
            # One value changed: the size follows it, without measuring the whole map again.
            self._size += utf8_len(value) - utf8_len(old)

    def remove(self, name: str) -> None:
        self.writes += 1
        name = name.lower()
        if name not in self._index():
            return
        self._size = -1
        self._items = [kv for kv in self._items if kv[0] != name]
        self._names = None

    def replace_all(self, items: Iterable[tuple[str, str]]) -> None:
        self.writes += 1
        self._size = -1
        self._items = [(k.lower(), v) for k, v in items]
        self._names = None

    def copy(self) -> HeaderMap:
        clone = HeaderMap()
        clone._items = list(self._items)
        return clone

    # -- wire format (the host call that serializes a map is compiled: fastcall.serialize_pairs) ------
    @classmethod
    def deserialize(cls, data: bytes) -> HeaderMap:
        clone = cls()
        clone._items = [(k.lower(), v) for k, v in deserialize_pairs(data)]
        return clone


def deserialize_pairs_bytes(data: bytes) -> list[tuple[bytes, bytes]]:
    """Decode pairs strictly, like cpp-host: any violation yields an empty list, never an error."""
    size = len(data)
    if size < 4 or size > MAX_PAIRS_BYTES:
        return []
    (count,) = _U32.unpack_from(data, 0)
    if count > MAX_PAIRS:
        return []
    pos = 4 + 8 * count
    if pos > size:
        return []
    out: list[tuple[bytes, bytes]] = []
    for i in range(count):
        klen, vlen = _U32x2.unpack_from(data, 4 + 8 * i)
        kend = pos + klen
        vend = kend + 1 + vlen
        if vend + 1 > size or data[kend] != 0 or data[vend] != 0:
            return []
        out.append((data[pos:kend], data[kend + 1 : vend]))
        pos = vend + 1
    if pos != size:
        return []
    return out


def deserialize_pairs(data: bytes) -> list[tuple[str, str]]:
    return [(_dec(k), _dec(v)) for k, v in deserialize_pairs_bytes(data)]
