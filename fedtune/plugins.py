"""Plug-in options: the settings an algorithm or a client loss declares in its own module.

A plug-in declares what it reads, next to its code (peft's `register_peft_method` is the model):

    @register
    class FedProx(FedLoRA):
        name = "fedprox"
        options = {"prox_mu": Option(0.01, "weight mu of the proximal term", interval="[0, inf)")}

`Settings` gains a field per option (`settings.prox_mu`, flag `--prox-mu`, TOML and run-config key
`prox-mu`), validated against its `choices` or `interval`. Settings are parsed before any plug-in
is imported (the CLI and the preflight must not wait for torch), so the declarations are also
kept as data in `plugins.json`, which this module generates from the registries together with
the other lists kept from them: the `[tool.flwr.app.config]` table of pyproject.toml and the
README's algorithm table. After adding or changing a plug-in:

    python -m fedtune.plugins          # rewrite the generated files
    python -m fedtune.plugins --check  # what tests/test_plugins.py runs: exit 1 if any is stale
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


# ---- generation (imports every plug-in: torch, transformers, peft) --------------------------------
def manifest() -> dict:
    """plugins.json's content, from the live registries."""
    from fedtune.algorithms import base as algorithms
    from fedtune import client_losses

    options: dict[str, dict] = {}
    kinds = {"algorithms": algorithms.registered(), "client-losses": client_losses.registered()}
    for kind, plugins in kinds.items():
        for name, plugin in plugins.items():
            for field, option in plugin.declared_options().items():
                entry = options.setdefault(field, {**option.to_json(), "used-by": []})
                if {k: v for k, v in entry.items() if k != "used-by"} != option.to_json():
                    raise ValueError(f"option {field} is declared twice, differently (by {entry['used-by']} and {name})")
                entry["used-by"].append(name)
    return {"algorithms": {name: cls.summary for name, cls in kinds["algorithms"].items()},
            "client-losses": {name: loss.summary for name, loss in kinds["client-losses"].items()},
            "options": options}


def flower_config_table() -> str:
    """pyproject.toml's `[tool.flwr.app.config]` body: every setting at its default."""
    from fedtune.config import Settings

    return "\n".join(f"{key} = {_toml(value)}" for key, value in Settings().to_dict().items())


def algorithm_table() -> str:
    """The README's algorithm table, from each algorithm's `card`."""
    from fedtune.algorithms import base as algorithms

    columns = ("what trains", "up (client -> server)", "down (server -> client)", "aggregation exact",
               "own rank per client", "paper")
    lines = ["| algorithm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, cls in algorithms.registered().items():
        lines.append(f"| `{name}` | " + " | ".join(cls.card.get(c, "-") for c in columns) + " |")
    return "\n".join(lines)


def _toml(value) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def generated_files(root: Path) -> dict[Path, str]:
    """Each generated file's path and what it must hold."""
    pyproject, readme = root / "pyproject.toml", root / "README.md"
    return {MANIFEST: json.dumps(manifest(), indent=2) + "\n",
            pyproject: _between(pyproject.read_text(), "[tool.flwr.app.config]\n", "", flower_config_table() + "\n"),
            readme: _between(readme.read_text(), "<!-- algorithms: generated by python -m fedtune.plugins -->\n",
                             "<!-- /algorithms -->", algorithm_table() + "\n")}


def _between(text: str, start: str, end: str, body: str) -> str:
    """`text` with what follows `start` up to `end` (or the end of the text) replaced by `body`."""
    i = text.index(start) + len(start)
    j = text.index(end, i) if end else len(text)
    return text[:i] + body + text[j:]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedtune.plugins", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    if not args.check and MANIFEST.read_text() != (content := json.dumps(manifest(), indent=2) + "\n"):
        MANIFEST.write_text(content)  # Settings is built from it at import: regenerate the rest in a new process
        import subprocess
        import sys

        print("rewrote: plugins.json")
        return subprocess.call([sys.executable, "-m", "fedtune.plugins"])
    stale = []
    for path, content in generated_files(Path(__file__).resolve().parents[1]).items():
        if path.read_text() != content:
            stale.append(path.name)
            if not args.check:
                path.write_text(content)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run: python -m fedtune.plugins")
        return 1
    print(("rewrote: " + ", ".join(stale)) if stale else "generated files are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
