"""What an exported model says about itself: `export.json` (read back by `fedtune predict` and
`fedtune evaluate`, so a model folder copied anywhere needs no `--task`) and a model card
(`README.md`: task, base model, method, federation, bytes, dev metrics, the command that made it)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

EXPORT = "export.json"
LICENSES = {"minilm": "apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)"}


def describe(folder: Path, settings: dict, summary: dict, labels: tuple[str, ...], base: str) -> None:
    """Write export.json and the model card into the export `folder`."""
    folder = Path(folder)
    method = summary.get("algorithm") or f"centralized {summary.get('method')}"
    export = {"task": settings["task"], "labels": list(labels), "max_length": settings["max-length"],
              "base_model": base, "method": method, "dev": summary.get("dev", {})}
    (folder / EXPORT).write_text(json.dumps(export, indent=2) + "\n")
    non_default = summary.get("settings", {})
    command = "fedtune " + ("run" if "algorithm" in summary else "centralized") + "".join(
        f" --{k} {shlex.quote(str(v))}" for k, v in non_default.items() if k not in ("out-dir", "glue-dir"))
    federation = (f"{summary['clients']} clients, {summary['rounds']} rounds, "
                  f"{summary['total_bytes_up'] / 1e6:.2f} MB up and {summary['total_bytes_down'] / 1e6:.2f} MB down "
                  f"in total" if "algorithm" in summary else "centralized (no federation)")
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary.get("dev", {}).items() if isinstance(v, (int, float)))
    card = f"""---
base_model: {base}
library_name: {"peft" if (folder / "adapter_config.json").is_file() else "transformers"}
license: {LICENSES.get(settings["model"], "see the base model's card")}
tags: [fedtune, text-classification, glue, {settings["task"]}]
---

# {settings["task"]} classifier trained with fedtune ({method})

- **Task**: GLUE {settings["task"]}; labels {", ".join(f"{i} = {name}" for i, name in enumerate(labels))}
- **Base model**: `{base}`
- **Method**: {method}; {federation}
- **Dev metrics** (GLUE dev{", holdout" if settings.get("holdout-fraction") else ""}): {metrics}
- **Seed**: {settings["seed"]}
- **Made by**: `{command}`

Load it with plain transformers{" and peft" if (folder / "adapter_config.json").is_file() else ""}, or
`fedtune predict <this folder> "a sentence"` (the task and labels are read from `{EXPORT}`).
"""
    (folder / "README.md").write_text(card)


def described_task(folder: Path) -> str | None:
    """The task an export says it was trained on (export.json), or None when it has no export.json."""
    path = Path(folder) / EXPORT
    if not path.is_file():
        return None
    try:
        task = json.loads(path.read_text(encoding="utf-8"))["task"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); delete it and pass --task") from None
    if not isinstance(task, str):
        raise ValueError(f"{path} names no task (task={task!r}); delete it and pass --task")
    return task
