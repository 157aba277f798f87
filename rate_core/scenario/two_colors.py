"""The ViZDoom-Two-Colors scenario: map, scripts and ViZDoom config, built from code.

The room: 1280 x 1280 units, ceiling 128, walls STONE2, ceiling CEIL4_1, light 160, floor NUKAGE1
that hurts 8 HP every 32 tics (tic 0 included). The player starts 320 units south of the centre,
facing north.

The scripts (ACS, assembled by rate_core.scenario.acs):
  OPEN    draw the colour (red or green, 50/50 from the engine's RNG, so ViZDoom's set_seed fixes
          it) into global 2; put a tall column of that colour at the centre; spawn 10 green and 10
          red items at random; after 90 tics remove the column; then forever: one green item,
          30 tics, one red item, 30 tics.
  ENTER   clear the player's inventory (no weapon).
  RIGHT   (an item of the pillar's colour) +25 HP up to 100, global 1 += 1.0, clear the inventory.
  WRONG   (the other colour) 25 damage while the armour just picked up is still held (so it
          absorbs part: -17 HP for green, -13 HP for red), global 1 -= 1.0, clear the inventory.
Items: GreenArmor is the green one; BlueArmor, whose Freedoom sprite is red, is the red one. An
item's pickup runs RIGHT or WRONG through its thing special (ACS_ExecuteAlways). Items spawn at
z = 20 anywhere their 20-unit radius fits (a spawn that fails is drawn again), so their centres are
uniform over the inner 1240 x 1240; they never despawn.

ViZDoom reads global 0 as the scenario reward (left at 0), USER1 = global 1 (the shaping counter,
16.16 fixed point) and USER2 = global 2 (is_red, 0 or 1). The config gives a living reward of 0.01
per tic and the buttons TURN_LEFT, TURN_RIGHT, MOVE_FORWARD, MOVE_BACKWARD.

`scenario_config()` builds the WAD and the config into a cache folder on first use and returns the
config's path.
"""

import hashlib
import os
import tempfile
from pathlib import Path

from rate_core.scenario.acs import CLOSED, ENTER, OPEN, Assembler, Script, fixed
from rate_core.scenario.udmf import UdmfMap
from rate_core.scenario.wad import write_wad

ROOM_SIZE = 1280
CEILING = 128
WALL, FLOOR, CEILING_FLAT = "STONE2", "NUKAGE1", "CEIL4_1"
LIGHT = 160
DAMAGING_FLOOR = 83  # sector special: 8 HP every 32 tics
PLAYER_START = (0, -320)  # facing north (angle 90), towards the centre
PILLAR_TICS = 90
SPAWN_EVERY_TICS = 30
START_ITEMS = 10  # of each colour
ITEM_RADIUS = 20
ITEM_Z = 20
HEAL, DAMAGE = 25, 25

GREEN_ITEM, RED_ITEM = "GreenArmor", "BlueArmor"
GREEN_PILLAR, RED_PILLAR = "TallGreenColumn", "TallRedColumn"

# ACS globals that ViZDoom reads.
REWARD, SHAPING, IS_RED = 0, 1, 2  # global 0 = reward, USER1, USER2
# Thing ids and script numbers.
GREEN_TID, RED_TID, PILLAR_TID = 1, 2, 3
START_SCRIPT, ENTER_SCRIPT, RIGHT_SCRIPT, WRONG_SCRIPT = 1, 2, 3, 4
# Line specials.
THING_DAMAGE, THING_REMOVE, ACS_EXECUTE_ALWAYS = 119, 132, 226
# Script variables of the OPEN script.
GREEN_SCRIPT_VAR, RED_SCRIPT_VAR, PILLAR_CLASS_VAR, COUNTER_VAR = 0, 1, 2, 3

BUTTONS = ("TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD", "MOVE_BACKWARD")
GAME_VARIABLES = ("HEALTH", "USER1", "USER2")


def build_map() -> str:
    """The TEXTMAP of the room: one sector, four walls, the player start."""
    room = UdmfMap(namespace="zdoom")
    sector = room.add_sector(heightfloor=0, heightceiling=CEILING, texturefloor=FLOOR, textureceiling=CEILING_FLAT,
                             lightlevel=LIGHT, special=DAMAGING_FLOOR)
    half = ROOM_SIZE // 2
    room.add_room([(-half, half), (half, half), (half, -half), (-half, -half)], sector, WALL)
    room.add_thing(*PLAYER_START, type=1, angle=90)
    return room.to_text()


def _spawn_item(acs: Assembler, script: Script, item: str, tid: int, script_var: int, name: str) -> None:
    """Inline code: spawn one `item` with `tid` at a random position (again until it fits), then
    give every item of that tid the pickup special ACS_ExecuteAlways(script in `script_var`)."""
    half = ROOM_SIZE / 2 - ITEM_RADIUS
    script.label(name)
    script.push(acs.string(item), fixed(-half), fixed(half))
    script.emit("RANDOM")
    script.push(fixed(-half), fixed(half))
    script.emit("RANDOM")
    script.push(fixed(ITEM_Z), tid, 0)
    script.emit("SPAWN")
    script.emit("IFNOTGOTO", name)  # nothing spawned: draw another position
    _set_pickup_special(script, tid, script_var)


def _set_pickup_special(script: Script, tid: int, script_var: int) -> None:
    script.push(tid, ACS_EXECUTE_ALWAYS)
    script.emit("PUSHSCRIPTVAR", script_var)
    script.push(0, 0, 0, 0)  # map (0: this one), three script arguments
    script.emit("SETTHINGSPECIAL")


def build_behavior() -> bytes:
    """The BEHAVIOR lump: the OPEN, ENTER and two pickup scripts (see the module docstring)."""
    acs = Assembler()

    start = acs.script(START_SCRIPT, OPEN)
    start.push(0, 1)
    start.emit("RANDOM")
    start.emit("ASSIGNGLOBALVAR", IS_RED)
    start.emit("PUSHGLOBALVAR", IS_RED)
    start.emit("IFNOTGOTO", "green_pillar")
    for value, var in ((WRONG_SCRIPT, GREEN_SCRIPT_VAR), (RIGHT_SCRIPT, RED_SCRIPT_VAR),
                       (acs.string(RED_PILLAR), PILLAR_CLASS_VAR)):
        start.push(value)
        start.emit("ASSIGNSCRIPTVAR", var)
    start.emit("GOTO", "pillar")
    start.label("green_pillar")
    for value, var in ((RIGHT_SCRIPT, GREEN_SCRIPT_VAR), (WRONG_SCRIPT, RED_SCRIPT_VAR),
                       (acs.string(GREEN_PILLAR), PILLAR_CLASS_VAR)):
        start.push(value)
        start.emit("ASSIGNSCRIPTVAR", var)
    start.label("pillar")
    start.emit("PUSHSCRIPTVAR", PILLAR_CLASS_VAR)
    start.push(0, 0, 0, PILLAR_TID, 0)  # x, y, z, tid, angle
    start.emit("SPAWN")
    start.emit("DROP")

    start.push(0)
    start.emit("ASSIGNSCRIPTVAR", COUNTER_VAR)
    start.label("start_items")
    _spawn_item(acs, start, GREEN_ITEM, GREEN_TID, GREEN_SCRIPT_VAR, "start_green")
    _spawn_item(acs, start, RED_ITEM, RED_TID, RED_SCRIPT_VAR, "start_red")
    start.emit("INCSCRIPTVAR", COUNTER_VAR)
    start.emit("PUSHSCRIPTVAR", COUNTER_VAR)
    start.push(START_ITEMS)
    start.emit("LT")
    start.emit("IFGOTO", "start_items")

    start.push(PILLAR_TICS)
    start.emit("DELAY")
    start.push(PILLAR_TID)
    start.emit("LSPEC1", THING_REMOVE)

    start.label("forever")
    _spawn_item(acs, start, GREEN_ITEM, GREEN_TID, GREEN_SCRIPT_VAR, "more_green")
    start.push(SPAWN_EVERY_TICS)
    start.emit("DELAY")
    _spawn_item(acs, start, RED_ITEM, RED_TID, RED_SCRIPT_VAR, "more_red")
    start.push(SPAWN_EVERY_TICS)
    start.emit("DELAY")
    start.emit("GOTO", "forever")

    enter = acs.script(ENTER_SCRIPT, ENTER)
    enter.emit("CLEARINVENTORY")
    enter.emit("TERMINATE")

    # Pickup scripts run with the player as activator (thing id 0 below). Thing_Damage with a
    # negative amount heals, up to the player's spawn health (100).
    for number, amount, counter in ((RIGHT_SCRIPT, -HEAL, "ADDGLOBALVAR"), (WRONG_SCRIPT, DAMAGE, "SUBGLOBALVAR")):
        pickup = acs.script(number, CLOSED)
        pickup.push(0, abs(amount))
        if amount < 0:
            pickup.emit("UNARYMINUS")
        pickup.push(0)  # damage type: none
        pickup.emit("LSPEC3", THING_DAMAGE)
        pickup.push(fixed(1.0))
        pickup.emit(counter, SHAPING)
        pickup.emit("CLEARINVENTORY")
        pickup.emit("TERMINATE")
    return acs.assemble()


def build_wad() -> bytes:
    """The scenario WAD: MAP01 as UDMF (TEXTMAP, BEHAVIOR)."""
    return write_wad([("MAP01", b""), ("TEXTMAP", build_map().encode("ascii")), ("BEHAVIOR", build_behavior()),
                      ("ENDMAP", b"")])


def build_config(wad_name: str) -> str:
    """The ViZDoom config; `wad_name` is the WAD's path relative to the config's folder."""
    return "\n".join([
        f"doom_scenario_path = {wad_name}",
        "doom_map = map01",
        "doom_skill = 3",
        "living_reward = 0.01",
        "episode_timeout = 10000",
        "screen_resolution = RES_320X180",
        "screen_format = RGB24",
        "render_hud = false",
        "render_crosshair = false",
        "render_weapon = false",
        "render_decals = false",
        "render_particles = false",
        "window_visible = false",
        "sound_enabled = false",
        "mode = PLAYER",
        f"available_buttons = {{ {' '.join(BUTTONS)} }}",
        f"available_game_variables = {{ {' '.join(GAME_VARIABLES)} }}",
        "",
    ])


def cache_dir() -> Path:
    """Where built scenarios live: $XDG_CACHE_HOME/rate_core/scenarios (default ~/.cache/...)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "rate_core" / "scenarios"


def _write_once(path: Path, data: bytes) -> None:
    """Write `path` under a temporary name and rename it into place, so that concurrent first
    uses never see a partial file (they write identical bytes)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def scenario_config(folder: Path | None = None) -> Path:
    """The path of the Two-Colors ViZDoom config, building it and its WAD into `folder` (default:
    cache_dir()) unless there already. The files are named by a hash of their contents, so a
    change to the builder never reuses a stale file."""
    folder = cache_dir() if folder is None else Path(folder)
    wad = build_wad()
    name = f"two_colors-{hashlib.sha256(wad + build_config('').encode('ascii')).hexdigest()[:16]}"
    _write_once(folder / f"{name}.wad", wad)
    config = folder / f"{name}.cfg"
    _write_once(config, build_config(f"{name}.wad").encode("ascii"))
    return config
