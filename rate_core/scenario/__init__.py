"""Doom scenario files built from Python: a WAD writer, a UDMF map writer and an ACS assembler.

`two_colors` puts them together into the ViZDoom-Two-Colors scenario (map and scripts), so the
project needs neither a level editor nor an ACS compiler, only `vizdoom`.
"""
