"""An assembler for compiled ACS scripts in the classic Hexen format (the BEHAVIOR lump).

Layout of the lump (every integer a little-endian int32, every offset absolute in the lump):

    b"ACS\\0", directory offset
    code          p-codes, each followed by its inline arguments
    directory     script count; per script: number + 1000 * kind, code offset, argument count
    strings       string count; the strings' offsets; the NUL-terminated strings

In this format every p-code and every inline argument takes four bytes (the byte-sized p-codes
such as PUSHBYTE belong to the newer formats and would misalign the stream here), and jump
targets are absolute byte offsets. A string argument (e.g. the class name for SPAWN) is pushed as
its index in the strings table. The format has no functions and no initialised map variables.

    acs = Assembler()
    script = acs.script(1, OPEN)
    script.label("loop")
    script.emit("PUSHNUMBER", 35)
    script.emit("DELAY")
    script.emit("GOTO", "loop")      # a label name: resolved to its byte offset
    lump = acs.assemble()
"""

import struct
from dataclasses import dataclass, field

# Script kinds (the directory stores number + 1000 * kind).
CLOSED, OPEN, ENTER = 0, 1, 4

# p-code numbers (ZDoom's numbering) -> number of inline int32 arguments.
PCODES: dict[str, tuple[int, int]] = {
    "TERMINATE": (1, 0),
    "PUSHNUMBER": (3, 1),
    "LSPEC1": (4, 1),  # line special (inline number) with 1 argument from the stack
    "LSPEC3": (6, 1),  # ... with 3 arguments from the stack
    "EQ": (19, 0),
    "LT": (21, 0),
    "ASSIGNSCRIPTVAR": (25, 1),
    "PUSHSCRIPTVAR": (28, 1),
    "INCSCRIPTVAR": (46, 1),
    "GOTO": (52, 1),
    "IFGOTO": (53, 1),
    "DROP": (54, 0),
    "DELAY": (55, 0),
    "RANDOM": (57, 0),  # pops min, max; pushes a random integer in [min, max]
    "UNARYMINUS": (78, 0),
    "IFNOTGOTO": (79, 1),
    "CLEARINVENTORY": (142, 0),  # of the script's activator
    "SPAWN": (149, 0),  # pops class (string index), x, y, z (fixed), tid, angle (byte); pushes count
    "SETTHINGSPECIAL": (180, 0),  # pops tid, special, arg0..arg4
    "ASSIGNGLOBALVAR": (181, 1),
    "PUSHGLOBALVAR": (182, 1),
    "ADDGLOBALVAR": (183, 1),
    "SUBGLOBALVAR": (184, 1),
}
JUMPS = {"GOTO", "IFGOTO", "IFNOTGOTO"}
MAX_LOCALS = 20  # script variables (arguments included) per script


def fixed(value: float) -> int:
    """A 16.16 fixed-point number, as ACS passes coordinates and fractions."""
    return int(round(value * 65536))


@dataclass
class Script:
    """The code of one script: instructions (p-code name, inline arguments) and labels."""

    number: int
    kind: int
    arg_count: int = 0
    instructions: list[tuple[str, tuple[int | str, ...]]] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    """label -> index of the instruction it marks"""

    def emit(self, pcode: str, *args: int | str) -> None:
        """Append a p-code with its inline arguments (a label name for the jumps)."""
        if pcode not in PCODES:
            raise ValueError(f"unknown p-code {pcode!r}; known: {', '.join(PCODES)}")
        expected = PCODES[pcode][1]
        if len(args) != expected:
            raise ValueError(f"{pcode} takes {expected} inline argument(s), got {len(args)}")
        if pcode in JUMPS and not isinstance(args[0], str):
            raise ValueError(f"{pcode} jumps to a label (a name), got {args[0]!r}")
        if pcode.endswith("SCRIPTVAR") and not 0 <= args[0] < MAX_LOCALS:
            raise ValueError(f"script variable {args[0]} is out of range 0..{MAX_LOCALS - 1}")
        self.instructions.append((pcode, args))

    def push(self, *values: int) -> None:
        for value in values:
            self.emit("PUSHNUMBER", value)

    def label(self, name: str) -> None:
        """Mark the position of the next instruction."""
        if name in self.labels:
            raise ValueError(f"label {name!r} defined twice in script {self.number}")
        self.labels[name] = len(self.instructions)

    def size(self) -> int:
        """Bytes of code: four per p-code and per inline argument."""
        return sum(4 * (1 + len(args)) for _, args in self.instructions)


@dataclass
class Assembler:
    """Scripts and strings of one BEHAVIOR lump."""

    scripts: list[Script] = field(default_factory=list)
    strings: list[str] = field(default_factory=list)

    def script(self, number: int, kind: int, arg_count: int = 0) -> Script:
        if not 0 < number < 1000:
            raise ValueError(f"script numbers are 1..999, got {number}")
        if any(s.number == number for s in self.scripts):
            raise ValueError(f"script {number} defined twice")
        script = Script(number, kind, arg_count)
        self.scripts.append(script)
        return script

    def string(self, text: str) -> int:
        """The index of `text` in the strings table (added on first use)."""
        if text not in self.strings:
            self.strings.append(text)
        return self.strings.index(text)

    def assemble(self) -> bytes:
        """The BEHAVIOR lump: header, code, scripts directory, strings table."""
        code = bytearray()
        starts = []
        offset = 8
        for script in self.scripts:
            starts.append(offset)
            offsets = [offset]  # byte offset of each instruction (and of the end)
            for _, args in script.instructions:
                offsets.append(offsets[-1] + 4 * (1 + len(args)))
            for pcode, args in script.instructions:
                words = [PCODES[pcode][0]]
                for arg in args:
                    if isinstance(arg, str):
                        if arg not in script.labels:
                            raise ValueError(f"undefined label {arg!r} in script {script.number}")
                        arg = offsets[script.labels[arg]]
                    words.append(arg)
                code += struct.pack(f"<{len(words)}i", *words)
            offset = offsets[-1]
        directory_offset = 8 + len(code)
        directory = struct.pack("<i", len(self.scripts))
        for script, start in zip(self.scripts, starts, strict=True):
            directory += struct.pack("<3i", script.number + 1000 * script.kind, start, script.arg_count)
        encoded = [s.encode("ascii") + b"\0" for s in self.strings]
        string_offset = directory_offset + len(directory) + 4 + 4 * len(encoded)
        directory += struct.pack("<i", len(encoded))
        for text in encoded:
            directory += struct.pack("<i", string_offset)
            string_offset += len(text)
        lump = b"ACS\0" + struct.pack("<i", directory_offset) + bytes(code) + directory + b"".join(encoded)
        # The engine reads an "ACSE"/"ACSe" tag just before the directory as the newer format.
        assert lump[directory_offset - 4:directory_offset] not in (b"ACSE", b"ACSe")
        return lump
