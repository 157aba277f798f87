"""What the tools' command lines share (tyro): help texts that state a field's default in words."""

import tyro

OWN_DEFAULT = tyro.conf.arg(help_behavior_hint="")
"""for a field whose help says its default in words ('default: the protocol's'): tyro adds no second one"""

TASK_DEFAULT = tyro.conf.arg(help_behavior_hint="(default: the task's)")
"""for a field left None to take the task's value (its TrainDefaults in rate_core.tasks)"""

NONE_DEFAULT = tyro.conf.arg(help_behavior_hint="(default: none)")
"""for a list of settings that is empty unless given"""
