"""What the tools' command lines share (tyro): `cli` parses a dataclass of arguments, and markers for
help texts that state a field's default in words."""

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Annotated, TypeVar

import tyro

T = TypeVar("T")

OWN_DEFAULT = tyro.conf.arg(help_behavior_hint="")
"""for a field whose help says its default in words ('default: the protocol's'): tyro adds no second one"""

TASK_DEFAULT = tyro.conf.arg(help_behavior_hint="(default: the task's)")
"""for a field left None to take the task's value (its TrainDefaults in rate_core.tasks)"""

NONE_DEFAULT = tyro.conf.arg(help_behavior_hint="(default: none)")
"""for a list of settings that is empty unless given"""


def field_docs(config_class: type) -> dict[str, str]:
    """Each field's docstring (the string under it in the class body) as one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(config_class)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def cli(config_class: type[T], args: list[str] | None = None) -> T:
    """tyro.cli(config_class), each field's help one paragraph. (tyro keeps the line break before every
    indented continuation line of a field docstring, so help texts broke mid-sentence at each source
    line on a narrow terminal.)"""
    docs = field_docs(config_class)
    hints = typing.get_type_hints(config_class, include_extras=True)
    fields = []
    for f in dataclasses.fields(config_class):
        if f.name in docs:
            fields.append((f.name, Annotated[hints[f.name], tyro.conf.arg(help=docs[f.name])],
                           dataclasses.field(default=f.default, default_factory=f.default_factory)))
    helped = dataclasses.make_dataclass(config_class.__name__, fields, bases=(config_class,))
    helped.__doc__ = config_class.__doc__
    helped.__module__ = config_class.__module__
    parsed = tyro.cli(helped, args=args)
    # an instance of config_class itself (the subclass made here could not be pickled, e.g. to workers)
    return config_class(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(config_class) if f.init})
