"""Options declared once, in groups, each building one frozen settings object.

A group is a function whose parameters are typer options (each reading an environment
variable, as pods set them) and whose return value is the settings object of one concern:
`kafka_options(...) -> KafkaConnection | None`. A command names the settings it needs as
ordinary parameters (`def create(kafka: KafkaConnection | None, ...)`) and `@uses_groups` puts
the group's options in their place, so `--sasl-password` is declared in one spot however many
commands take it, and each command body sees built, validated settings, not loose values.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from copy import copy
from typing import Annotated, Any, TypeVar, get_args, get_origin, get_type_hints

from typer.models import ParameterInfo

Command = TypeVar("Command", bound=Callable[..., Any])


class _Group:
    def __init__(self, builder: Callable[..., Any], title: str) -> None:
        self.builder = builder
        self.options = [_in_panel(option, title) for option in _keyword_only(builder)]

    def build(self, values: dict[str, Any]) -> Any:
        """The settings object, from (and consuming) this group's values."""
        return self.builder(**{option.name: values.pop(option.name) for option in self.options})


_GROUPS: dict[Any, _Group] = {}  # settings type -> the group that builds it


def option_group(title: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated builder as the group of options for the type it returns; its
    options are listed under `title` in --help."""

    def register(builder: Callable[..., Any]) -> Callable[..., Any]:
        built = get_type_hints(builder, include_extras=True)["return"]
        if built in _GROUPS:
            raise TypeError(f"{built} already has an option group")
        _GROUPS[built] = _Group(builder, title)
        return builder

    return register


def uses_groups(command: Command) -> Command:
    """Replace each parameter whose type has an option group by that group's options."""
    expanded: list[inspect.Parameter] = []
    groups: dict[str, _Group] = {}
    for parameter in _keyword_only(command):
        group = _GROUPS.get(parameter.annotation)
        if group is None:
            expanded.append(parameter)
        else:
            groups[parameter.name] = group
            expanded += group.options
    names = [parameter.name for parameter in expanded]
    if len(names) != len(set(names)):
        raise TypeError(f"{command.__name__}: two option groups declare the same option")

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        for name, group in groups.items():
            values[name] = group.build(values)
        return command(**values)

    run.__signature__ = inspect.Signature(expanded)  # type: ignore[attr-defined]
    run.__annotations__ = {parameter.name: parameter.annotation for parameter in expanded}
    return run  # type: ignore[return-value]


def _keyword_only(function: Callable[..., Any]) -> list[inspect.Parameter]:
    """The function's parameters with their annotations resolved; keyword-only, since typer
    passes every value by name and a group may stand before a command's own arguments."""
    hints = get_type_hints(function, include_extras=True)
    return [
        parameter.replace(
            annotation=hints.get(parameter.name, parameter.annotation),
            kind=parameter.KEYWORD_ONLY,
        )
        for parameter in inspect.signature(function).parameters.values()
    ]


def _in_panel(option: inspect.Parameter, title: str) -> inspect.Parameter:
    if get_origin(option.annotation) is not Annotated:
        raise TypeError(f"option {option.name} of a group needs Annotated[..., typer.Option()]")
    kind, *metadata = get_args(option.annotation)
    placed = []
    for item in metadata:
        if isinstance(item, ParameterInfo) and item.rich_help_panel is None:
            item = copy(item)
            item.rich_help_panel = title
        placed.append(item)
    return option.replace(annotation=Annotated[kind, *placed])
