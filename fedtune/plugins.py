"""Plug-in options: the settings an algorithm or a client loss declares in its own module.

A plug-in declares what it reads, next to its code (peft's `register_peft_method` is the model):

    @register
    class FedProx(FedLoRA):
        name = "fedprox"
        options = {"prox_mu": Option(0.01, "weight mu of the proximal term", interval="[0, inf)")}

`Settings` gains a field per option (`settings.prox_mu`, flag `--prox-mu`, TOML and run-config key
`prox-mu`), validated against its `choices` or `interval`. Settings are parsed before any plug-in
is imported (the CLI and the preflight must not wait for torch), so the declarations are also
kept as data in `plugins.json`, which `fedtune.generate` writes from the registries together with
the other lists kept from them (pyproject's `[tool.flwr.app.config]`, the README's algorithm
table). After adding or changing a plug-in:

    python -m fedtune.generate          # rewrite the generated files
    python -m fedtune.generate --check  # what tests/test_plugins.py runs: exit 1 if any is stale
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

MANIFEST = Path(__file__).with_name("plugins.json")
_INTERVAL = re.compile(r"^([\[(])\s*(-inf|[-+0-9.e]+)\s*,\s*(inf|[-+0-9.e]+)\s*([\])])$")


@dataclass(frozen=True)
class Option:
    """One setting a plug-in reads.

    Parameters
    ----------
    default : int | float | str
        Its value when not given; its type is the setting's type.
    help : str
        One line for `--help`.
    choices : tuple[str, ...], optional
        The values allowed (strings).
    interval : str, optional
        The numbers allowed, as an interval: "[0, 1)", "(0, inf)".
    """

    default: int | float | str
    help: str
    choices: tuple[str, ...] | None = None
    interval: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.default, bool) or not isinstance(self.default, (int, float, str)):
            raise TypeError(f"an option's default is an int, float or str, not {self.default!r}")
        if self.interval is not None:
            parse_interval(self.interval)
        if problem := self.problem("default", self.default):
            raise ValueError(f"the default is not allowed: {problem}")

    @property
    def type(self) -> str:
        return type(self.default).__name__

    def problem(self, key: str, value) -> str | None:
        """Why `value` is not allowed for setting `key`, or None."""
        if self.choices is not None and value not in self.choices:
            return f"{key}={value!r} (choose from: {', '.join(self.choices)})"
        if self.interval is not None and not in_interval(value, self.interval):
            return f"{key}={value} (must be in {self.interval})"
        return None

    def to_json(self) -> dict:
        return {"default": self.default, "help": self.help, "choices": list(self.choices) if self.choices else None,
                "interval": self.interval}

    @classmethod
    def from_json(cls, data: dict) -> Option:
        return cls(data["default"], data["help"], tuple(data["choices"]) if data["choices"] else None, data["interval"])


def parse_interval(text: str) -> tuple[bool, float, float, bool]:
    """"[0, 1)" -> (closed below, 0.0, 1.0, closed above)."""
    match = _INTERVAL.match(text)
    if not match:
        raise ValueError(f"interval {text!r} is not of the form '[low, high)' (low/high numbers or -inf/inf)")
    return match[1] == "[", float(match[2]), float(match[3]), match[4] == "]"


def in_interval(value: float, text: str) -> bool:
    closed_low, low, high, closed_high = parse_interval(text)
    if not math.isfinite(value):
        return False
    above = value >= low if closed_low else value > low
    below = value <= high if closed_high else value < high
    return above and below


@cache
def declared_options() -> dict[str, tuple[str, Option]]:
    """Every plug-in option from plugins.json: field name -> (the plug-ins that read it, Option)."""
    data = json.loads(MANIFEST.read_text())
    return {name: (entry["used-by"], Option.from_json(entry)) for name, entry in data["options"].items()}


def declared_names(kind: str) -> tuple[str, ...]:
    """The registered names of a kind ("algorithms", "client-losses") as plugins.json lists them."""
    return tuple(json.loads(MANIFEST.read_text())[kind])
