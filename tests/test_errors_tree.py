"""Every error class is drawn in the tree of vfiocaps.errors and exported from its package."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import vfiocaps
from vfiocaps import errors


def _error_classes() -> dict[type[errors.VfiocapsError], str]:
    """Each error class defined in vfiocaps, by the module that defines it."""
    found: dict[type[errors.VfiocapsError], str] = {}
    for info in pkgutil.walk_packages(vfiocaps.__path__, "vfiocaps."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, errors.VfiocapsError)
                and value.__module__ == info.name
            ):
                found[value] = info.name
    return found


def test_the_tree_names_every_error_class_where_it_is_exported() -> None:
    tree = errors.__doc__ or ""
    missing = []
    for cls, module in _error_classes().items():
        if cls is errors.VfiocapsError:
            continue
        parts = module.split(".")
        name = cls.__name__ if module == "vfiocaps.errors" else f"{parts[1]}.{cls.__name__}"
        if f"+-- {name} " not in tree:
            missing.append(name)
    assert missing == []


def test_errors_of_a_package_are_exported_from_it() -> None:
    missing = []
    for cls, module in _error_classes().items():
        parts = module.split(".")
        if len(parts) <= 2:
            continue
        package = importlib.import_module(".".join(parts[:2]))
        if getattr(package, cls.__name__, None) is not cls or cls.__name__ not in package.__all__:
            missing.append(f"{parts[1]}.{cls.__name__}")
    assert missing == []
