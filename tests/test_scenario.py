"""The scenario builder: WAD container, UDMF text, ACS assembly, and the Two-Colors files it writes."""

import struct
import threading

import pytest

from rate_core.scenario import two_colors
from rate_core.scenario.acs import CLOSED, ENTER, OPEN, PCODES, Assembler, fixed
from rate_core.scenario.udmf import UdmfMap, format_value
from rate_core.scenario.wad import read_wad, write_wad


# ------------------------------------------------------------------------------------------ WAD
def test_wad_round_trip_and_layout():
    lumps = [("MAP01", b""), ("TEXTMAP", b"namespace = \"zdoom\";"), ("BEHAVIOR", bytes(range(7))), ("ENDMAP", b"")]
    wad = write_wad(lumps)
    assert read_wad(wad) == lumps
    magic, count, directory = struct.unpack_from("<4sii", wad)
    assert (magic, count) == (b"PWAD", 4)
    assert directory == 12 + 20 + 7 and len(wad) == directory + 4 * 16  # header, data, 16-byte entries
    offset, size, name = struct.unpack_from("<ii8s", wad, directory + 16)
    assert (offset, size, name) == (12, 20, b"TEXTMAP\0")


def test_wad_rejects_bad_lump_names_and_files():
    with pytest.raises(ValueError, match="1 to 8"):
        write_wad([("TOOLONGNAME", b"")])
    with pytest.raises(ValueError, match="not a WAD"):
        read_wad(b"JUNK" + bytes(8))


# ----------------------------------------------------------------------------------------- UDMF
def test_udmf_values_and_blocks():
    assert [format_value(v) for v in (True, False, 7, -2.5, 640.0, 'a "b" \\')] == [
        "true", "false", "7", "-2.5", "640.0", '"a \\"b\\" \\\\"']
    room = UdmfMap()
    sector = room.add_sector(heightfloor=0, heightceiling=128, texturefloor="NUKAGE1", special=83)
    room.add_room([(-64, 64), (64, 64), (64, -64), (-64, -64)], sector, "STONE2")
    room.add_thing(0, -32, type=1, angle=90)
    text = room.to_text()
    assert text.startswith('namespace = "zdoom";\n')
    assert text.count("vertex\n{") == 4 and text.count("linedef\n{") == 4 and text.count("sidedef\n{") == 4
    assert "sector\n{\nheightfloor = 0;\nheightceiling = 128;\ntexturefloor = \"NUKAGE1\";\nspecial = 83;\n}" in text
    assert "thing\n{\nx = 0.0;\ny = -32.0;\ntype = 1;\nangle = 90;\nskill1 = true;" in text
    assert "linedef\n{\nv1 = 3;\nv2 = 0;\nsidefront = 3;\nblocking = true;\n}" in text


def test_room_walls_face_inward():
    """Clockwise corners: the room's centre is on the right of every wall (its front side)."""
    room = UdmfMap()
    room.add_room([(-640, 640), (640, 640), (640, -640), (-640, -640)], room.add_sector(), "STONE2")
    for line in room.linedefs:
        a, b = room.vertices[line["v1"]], room.vertices[line["v2"]]
        cross = (b["x"] - a["x"]) * (0 - a["y"]) - (b["y"] - a["y"]) * (0 - a["x"])
        assert cross < 0  # negative: the centre lies to the right of a -> b


# ------------------------------------------------------------------------------------------ ACS
def _words(lump: bytes, start: int, count: int) -> list[int]:
    return list(struct.unpack_from(f"<{count}i", lump, start))


def test_acs_int32_encoding_and_label_resolution():
    acs = Assembler()
    script = acs.script(1, OPEN)
    script.push(-5, fixed(1.5))  # 8..23
    script.label("loop")  # byte 24
    script.push(35)
    script.emit("DELAY")
    script.emit("IFNOTGOTO", "end")
    script.emit("GOTO", "loop")
    script.label("end")
    script.emit("TERMINATE")
    lump = acs.assemble()
    assert lump[:4] == b"ACS\0"
    code = _words(lump, 8, 12)
    assert code == [3, -5, 3, 98304, 3, 35, 55, 79, 52, 52, 24, 1]
    #              PUSH -5 PUSH 1.5   PUSH 35 DELAY IFNOTGOTO end(52) GOTO loop(24) TERMINATE
    assert lump[8:12] == b"\x03\0\0\0" and lump[12:16] == b"\xfb\xff\xff\xff"  # little-endian, signed
    assert script.size() == 48 and struct.unpack_from("<i", lump, 4)[0] == 8 + 48


def test_acs_directory_and_strings():
    acs = Assembler()
    first = acs.script(1, OPEN)
    first.push(acs.string("GreenArmor"))
    first.emit("DROP")
    first.emit("TERMINATE")
    second = acs.script(7, ENTER, arg_count=2)
    second.push(acs.string("BlueArmor"), acs.string("GreenArmor"))  # repeated strings share an index
    second.emit("TERMINATE")
    third = acs.script(9, CLOSED)
    third.emit("TERMINATE")
    lump = acs.assemble()
    directory = struct.unpack_from("<i", lump, 4)[0]
    entries = _words(lump, directory, 1 + 3 * 3)
    assert entries == [3, 1 + 1000, 8, 0, 7 + 4000, 8 + 16, 2, 9, 8 + 16 + 20, 0]
    assert _words(lump, 8, 2) == [PCODES["PUSHNUMBER"][0], 0] and _words(lump, 24, 4) == [3, 1, 3, 0]
    table = directory + 4 + 3 * 12
    count, *offsets = _words(lump, table, 3)
    assert count == 2
    assert [lump[o:lump.index(b"\0", o)] for o in offsets] == [b"GreenArmor", b"BlueArmor"]


def test_acs_rejects_mistakes():
    script = Assembler().script(1, OPEN)
    with pytest.raises(ValueError, match="unknown p-code"):
        script.emit("PUSHBYTE", 1)
    with pytest.raises(ValueError, match="takes 1 inline"):
        script.emit("PUSHNUMBER")
    with pytest.raises(ValueError, match="label"):
        script.emit("GOTO", 8)
    with pytest.raises(ValueError, match="out of range"):
        script.emit("ASSIGNSCRIPTVAR", 20)
    acs = Assembler()
    acs.script(2, CLOSED).emit("GOTO", "nowhere")
    with pytest.raises(ValueError, match="undefined label 'nowhere'"):
        acs.assemble()


# ----------------------------------------------------------------------------------- Two-Colors
def test_two_colors_wad_is_deterministic_and_complete():
    wad = two_colors.build_wad()
    assert wad == two_colors.build_wad()
    lumps = read_wad(wad)
    assert [name for name, _ in lumps] == ["MAP01", "TEXTMAP", "BEHAVIOR", "ENDMAP"]
    textmap = lumps[1][1].decode()
    assert "special = 83;" in textmap and 'texturefloor = "NUKAGE1";' in textmap
    assert textmap.count("vertex\n{") == 4 and "type = 1;\nangle = 90;" in textmap
    behavior = lumps[2][1]
    for name in ("TallRedColumn", "TallGreenColumn", "GreenArmor", "BlueArmor"):
        assert name.encode() + b"\0" in behavior


def test_scenario_config_builds_once_into_the_cache(tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(two_colors.scenario_config(tmp_path)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    config = results[0]
    wad = config.with_suffix(".wad")
    assert wad.read_bytes() == two_colors.build_wad()
    assert f"doom_scenario_path = {wad.name}" in config.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([config.name, wad.name])  # no temporary files left
