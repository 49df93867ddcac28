"""The README's reading path names functions and classes that exist."""

import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def reading_path_names():
    text = README.read_text()
    table = text[text.index("### A reading path"):]
    table = table[:table.index("\n\n", table.index("| 1 |"))]
    names = []
    for row in re.findall(r"^\| \d+ \| (.+?) \|", table, re.MULTILINE):
        previous = None
        for name in re.findall(r"`([^`]+)`", row):
            if name.startswith("."):  # `.route`: a method of the class named before it
                name = previous.rsplit(".", 1)[0] + name
            names.append(name)
            previous = name
    return names


def test_every_name_on_the_reading_path_exists():
    names = reading_path_names()
    assert len(names) >= 15
    for name in names:
        module, *attributes = name.split(".")
        value = importlib.import_module(module)
        for attribute in attributes:
            assert hasattr(value, attribute), f"README reading path: {name} does not exist"
            value = getattr(value, attribute)
