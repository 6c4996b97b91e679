"""The planning methods, one table: each planner module of this package registers itself with @register_planner.

A planner is a name, a one-line help, an options dataclass (its fields, made with option(), carry each option's
default and help) and make(model, options, context) -> Plan. The modules of this package are imported the first time
the table is read, so a new method is one new file here: `ewq-gguf convert --method NAME`, its flags and help (made
from the options in cli.py) and ewq_gguf.convert / plan (api.make_plan) reach it through planners().
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from ..errors import InputError

if TYPE_CHECKING:
    from ..calibrate.imatrix import ImportanceMatrix
    from ..source.model import SourceModel
    from .plan import Plan

DEFAULT_METHOD = "ewq"
# convert(type="Q8_0") names no method: one type for every weight is the uniform method's option
TYPE_ONLY_METHOD = "uniform"


@dataclass(frozen=True)
class PlanContext:
    """What a planner may use besides its options."""

    device: str                              # "auto", "cpu" or "cuda": where measurements run
    progress: bool                           # progress bars on stderr
    importance: Optional[ImportanceMatrix]   # the importance matrix the file will be quantized with, if any
    file_size: Callable[[Plan], int]         # the exact size of the file a plan makes, header included


@dataclass(frozen=True)
class Planner:
    """One planning method, as its module registered it."""

    name: str
    help: str
    options_class: type                                       # a dataclass of option() fields
    make: Callable[[SourceModel, Any, PlanContext], Plan]

    def option_fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.options_class)

    def takes(self, option_name: str) -> bool:
        return any(field.name == option_name for field in self.option_fields())

    def options_from(self, given: Mapping[str, Any]) -> Any:
        """The options dataclass with `given` (option name -> value) over its defaults. An option this method does
        not take is an InputError rather than silently ignored."""
        stray = [name for name in given if not self.takes(name)]
        if stray:
            flags = ", ".join("--" + name.replace("_", "-") for name in stray)
            raise InputError(f"{flags}: not used by --method {self.name}")
        return self.options_class(**given)


# name -> Planner, filled as the planner modules are imported (planners() imports them all)
_TABLE: dict[str, Planner] = {}


def option(default: Any, help: str, *, value_type: type = str, choices: Sequence[str] = (), file: bool = False,
           default_text: Optional[str] = None) -> Any:
    """A field of a planner's options dataclass: its default, and what the command line shows for its flag.

    value_type: what a command-line value is converted to (str, float, int); choices: the only values allowed;
    file: the value names a file (a Python caller may pass the loaded object instead); default_text: how a None
    default is described (what the method does without the option)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "value_type": value_type, "choices": tuple(choices), "file": file, "default_text": default_text})


def register_planner(name: str, options_class: type, help: str) -> Callable[[Callable], Callable]:
    """Decorator of a planner module's make(model, options, context) -> Plan: enters it in the table as `name`, with
    its options dataclass and one line of help."""
    if not dataclasses.is_dataclass(options_class):
        raise TypeError(f"planner {name}: the options must be a dataclass, not {options_class!r}")

    def enter(make: Callable) -> Callable:
        if name in _TABLE:
            raise ValueError(f"two planners are named {name!r}: {_TABLE[name].make.__module__} and {make.__module__}")
        _TABLE[name] = Planner(name, help, options_class, make)
        return make
    return enter


@functools.cache
def _import_planner_modules() -> None:
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")


def planners() -> dict[str, Planner]:
    """Every planning method by name, in name order."""
    _import_planner_modules()
    return dict(sorted(_TABLE.items()))


def planner_for(method: Optional[str], given: Mapping[str, Any]) -> Planner:
    """The planner `method` names; without one, uniform when a `type` is given, else ewq. InputError for a name that
    is not in the table."""
    table = planners()
    name = method or (TYPE_ONLY_METHOD if given.get("type") is not None else DEFAULT_METHOD)
    if name not in table:
        raise InputError(f"unknown method '{name}' (choose from {', '.join(table)})")
    return table[name]
