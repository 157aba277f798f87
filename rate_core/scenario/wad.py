"""WAD files: the container Doom engines load maps and scripts from.

Layout (all integers little-endian int32):

    header      b"PWAD", lump count, directory offset
    lump data   the lumps' bytes, one after another
    directory   per lump: data offset, data size, name (8 bytes, NUL padded, upper case)

A UDMF map is the marker lump MAP01 (empty), then TEXTMAP, optionally BEHAVIOR, then ENDMAP.
"""

import struct

_HEADER = struct.Struct("<4sii")
_ENTRY = struct.Struct("<ii8s")


def _lump_name(name: str) -> bytes:
    encoded = name.upper().encode("ascii")
    if not 1 <= len(encoded) <= 8:
        raise ValueError(f"a lump name has 1 to 8 ASCII characters, got {name!r}")
    return encoded.ljust(8, b"\0")


def write_wad(lumps: list[tuple[str, bytes]]) -> bytes:
    """A PWAD holding `lumps` ((name, data) pairs, in order; names may repeat, as map lumps do)."""
    data = bytearray(_HEADER.size)
    directory = bytearray()
    for name, payload in lumps:
        directory += _ENTRY.pack(len(data), len(payload), _lump_name(name))
        data += payload
    _HEADER.pack_into(data, 0, b"PWAD", len(lumps), len(data))
    return bytes(data + directory)


def read_wad(wad: bytes) -> list[tuple[str, bytes]]:
    """The (name, data) lumps of a WAD (IWAD or PWAD), in directory order."""
    magic, count, offset = _HEADER.unpack_from(wad, 0)
    if magic not in (b"PWAD", b"IWAD"):
        raise ValueError(f"not a WAD file: starts with {magic!r}")
    lumps = []
    for i in range(count):
        start, size, name = _ENTRY.unpack_from(wad, offset + i * _ENTRY.size)
        lumps.append((name.rstrip(b"\0").decode("ascii"), wad[start:start + size]))
    return lumps
