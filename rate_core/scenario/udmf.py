"""UDMF map text (the TEXTMAP lump): a map as plain-text blocks of `key = value;` fields.

    namespace = "zdoom";
    vertex { x = -640.0; y = 640.0; }
    linedef { v1 = 0; v2 = 1; sidefront = 0; blocking = true; }
    ...

Blocks refer to each other by index in order of appearance (a linedef's v1 is the index of a
vertex, a sidedef's sector the index of a sector), which is what the add_* methods return. The
engine builds the BSP nodes of a UDMF map itself, so no node builder is needed.
"""

from dataclasses import dataclass, field

Value = bool | int | float | str


def format_value(value: Value) -> str:
    """A UDMF literal: true/false, an integer, a float (always with a decimal point) or a quoted string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if "e" not in repr(value) else f"{value:.6f}"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"UDMF fields are bool, int, float or str, got {type(value).__name__}")


def format_block(kind: str, fields: dict[str, Value]) -> str:
    lines = [kind, "{"] + [f"{key} = {format_value(value)};" for key, value in fields.items()] + ["}"]
    return "\n".join(lines) + "\n"


@dataclass
class UdmfMap:
    """A map under construction; `to_text()` gives the TEXTMAP lump."""

    namespace: str = "zdoom"
    vertices: list[dict] = field(default_factory=list)
    linedefs: list[dict] = field(default_factory=list)
    sidedefs: list[dict] = field(default_factory=list)
    sectors: list[dict] = field(default_factory=list)
    things: list[dict] = field(default_factory=list)

    def add_vertex(self, x: float, y: float) -> int:
        self.vertices.append({"x": float(x), "y": float(y)})
        return len(self.vertices) - 1

    def add_sector(self, **fields: Value) -> int:
        """fields: heightfloor, heightceiling, texturefloor, textureceiling, lightlevel, special, ..."""
        self.sectors.append(fields)
        return len(self.sectors) - 1

    def add_sidedef(self, sector: int, **fields: Value) -> int:
        """fields: texturemiddle, texturetop, texturebottom, offsetx, ..."""
        self.sidedefs.append({"sector": sector, **fields})
        return len(self.sidedefs) - 1

    def add_linedef(self, v1: int, v2: int, sidefront: int, **fields: Value) -> int:
        """A line from vertex v1 to v2; its front side (sidefront) is on the right of v1 -> v2."""
        self.linedefs.append({"v1": v1, "v2": v2, "sidefront": sidefront, **fields})
        return len(self.linedefs) - 1

    def add_thing(self, x: float, y: float, type: int, angle: int = 0, **fields: Value) -> int:
        """A map thing by editor number (1: player 1 start), present in every skill and game mode
        unless `fields` says otherwise."""
        flags = {f"skill{i}": True for i in range(1, 6)} | {"single": True, "coop": True, "dm": True}
        self.things.append({"x": float(x), "y": float(y), "type": type, "angle": angle, **flags, **fields})
        return len(self.things) - 1

    def add_room(self, corners: list[tuple[float, float]], sector: int, wall_texture: str) -> None:
        """One-sided walls around `sector` through `corners`, given clockwise (seen from above, y
        north) so that every wall's front side faces into the room."""
        first = len(self.vertices)
        for x, y in corners:
            self.add_vertex(x, y)
        for i in range(len(corners)):
            side = self.add_sidedef(sector, texturemiddle=wall_texture)
            self.add_linedef(first + i, first + (i + 1) % len(corners), side, blocking=True)

    def to_text(self) -> str:
        parts = [f"namespace = {format_value(self.namespace)};\n"]
        for kind, blocks in (("thing", self.things), ("vertex", self.vertices), ("linedef", self.linedefs),
                             ("sidedef", self.sidedefs), ("sector", self.sectors)):
            parts += [format_block(kind, fields) for fields in blocks]
        return "\n".join(parts)
