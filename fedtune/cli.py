"""The `fedtune` command. Every setting is a flag (`--lora-r 8`); `--config` reads a TOML file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from fedtune.config import Settings, key_of
from fedtune.console import quiet_libraries

# Sub-command -> the settings it reads (all others are still accepted and saved).
COMMANDS = {
    "centralized": "train a centralized baseline: --method finetune|lora|kd",
    "teacher": "pre-train the teacher on the public slice (reused by kd and fedkdlora runs)",
    "run": "run a federated algorithm on Flower's simulation engine (N virtual clients)",
    "resume": "continue an interrupted federated run from its last checkpointed round",
    "algorithms": "list the registered federated algorithms",
    "compare": "run the method-comparison grid (centralized + federated, several seeds); finished cells are reused",
    "report": "print a Markdown table of the finished runs under a folder",
    "predict": "label sentences with an exported model (a run's model/ folder)",
    "evaluate": "loss and metrics of an exported model on GLUE dev or a labelled TSV, as a run reports them",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == "algorithms":
            continue
        if name == "report":
            sub.add_argument("folder", help="folder holding run folders (searched recursively)")
            continue
        if name in ("predict", "evaluate"):
            sub.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a run's model/ folder")
            sub.add_argument("--task", choices=("cola", "sst2"), help="default: the run's (config.json beside MODEL_DIR)")
            if name == "predict":
                sub.add_argument("sentences", nargs="*", metavar="SENTENCE", help="sentences to label")
                sub.add_argument("--file", type=Path, help="more sentences, one a line")
                sub.add_argument("--json", action="store_true", help="JSON lines instead of a table")
            else:
                sub.add_argument("--file", type=Path, help="a labelled TSV in the task's GLUE format (default: GLUE dev)")
                sub.add_argument("--glue-dir", default="", help="GLUE folder for dev (default: the run's, or GLUE_DIR)")
            continue
        if name == "resume":
            sub.add_argument("folder", help="the interrupted run's folder (<name>.incomplete); its config.json is used")
            sub.add_argument("--quiet", action="store_true", help="no progress bars or tables")
            continue
        if name == "compare":
            from fedtune.compare import PRESETS

            sub.add_argument("--preset", choices=sorted(PRESETS), default="small",
                             help="budget: small (quick smoke grid; CoLA gets all its rows), standard (every method "
                             "trains long enough to compare: 10 rounds, all rows; ~1 h a grid per seed on 2 cores) "
                             "or full (GPU); flags override it")
            sub.add_argument("--tune", action="store_true",
                             help="first choose each method's learning rate on a holdout of the private train rows "
                             "(never GLUE dev) at 30%% of the budget; trials are cached and recorded in results.json")
            sub.add_argument("--tune-share", type=float, default=None, metavar="FLOAT",
                             help="with --tune: the share of each row's rounds (and centralized epochs) a trial "
                             "runs (default 0.3; 1 tunes at the whole budget, for rows whose best rate over a short "
                             "trial overshoots over the whole run)")
            sub.add_argument("--seeds", type=int, default=2, help="seeds per method (default: 2)")
            sub.add_argument("--jobs", type=int, default=1, metavar="N",
                             help="run N cells (and first tuning trials) at a time, each in its own process with "
                             "1/N of the CPU threads (fewer cells to run than N: an equal share each; --engine local), "
                             "longest first; the results are the same to float error (default: 1)")
            sub.add_argument("--rank-sweep", action="store_true", help="add Fed-LoRA and Fed-LoRA-KD at r=4,8,16,32")
            sub.add_argument("--cached-only", action="store_true",
                             help="train nothing: write the table of the rows whose cells (and tuning trials) are all "
                             "finished, and name the rows left out (e.g. while the grid still runs elsewhere)")
            sub.add_argument("--methods", default="", help="comma-separated row labels to run (default: all; "
                             "`fedtune algorithms` lists the algorithms, each with its row labels; with --remedies, "
                             "'<row> + <remedy>' names one remedied row)")
            sub.add_argument("--remedies", default="", help="comma-separated label-skew remedies to add after each "
                             "federated row: a client loss (fedlc, logit-adjust, fedrs, feddecorr, moon), equal-steps (every client "
                             "the mean client's local steps, uniform weights), scaffold, server-finetune (the server "
                             "trains on its public slice: the server-data baseline), ccvr (the classifier retrained after "
                             "the last round from the clients' feature statistics) or ccvr-lda (set from them in "
                             "closed form), lda-init (set so before round 1), freeze-head (clients never train the "
                             "classifier: FedBABU), sgd (clients train with plain SGD), server-momentum (FedAvgM, momentum "
                             "0.9), swa (the final model the mean of the last quarter of the rounds' models); 'a+b' "
                             "combines them "
                             "(e.g. feddecorr+ccvr-lda); results go to <grid>-remedies/")
        sub.add_argument("--config", metavar="FILE", help="TOML file of settings (flags given here win)")
        sub.add_argument("--quiet", action="store_true", help="no progress bars or tables")
        for f in dataclasses.fields(Settings):
            if f.metadata["centralized"] and name == "run" or f.metadata["federated"] and name in ("centralized",
                                                                                                     "teacher"):
                continue  # options this command never reads
            choices = f.metadata.get("choices")
            shown = f"choices: {', '.join(choices)}; " if choices else ""
            sub.add_argument(f"--{key_of(f.name)}", dest=f.name, default=argparse.SUPPRESS, metavar=f.type.upper(),
                             choices=choices, help=f"{f.metadata['help']} ({shown}default: {f.default!r})")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags over the TOML file over the defaults (for `compare`: over the task's preset)."""
    given = {key_of(f.name): getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)}
    base = Settings()
    if args.command == "compare":
        from fedtune.compare import preset_settings

        task = given.get("task") or (Settings.from_toml(args.config).task if args.config else base.task)
        base = preset_settings(args.preset, {"task": task})
    base = Settings.from_toml(args.config, base) if args.config else base
    return Settings.from_dict(given, base)


def _predict(args: argparse.Namespace) -> int:
    from fedtune.predict import predict

    sentences = list(args.sentences)
    if args.file:
        if args.file.is_dir():
            raise ValueError(f"--file {args.file} is a folder; give a text file with one sentence a line")
        if not args.file.is_file():
            raise FileNotFoundError(f"--file {args.file} does not exist")
        try:
            text = args.file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"--file {args.file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        sentences += [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise ValueError("nothing to label: give sentences or --file")
    quiet_libraries()
    rows = predict(args.model_dir, sentences, args.task)
    if args.json:
        print("\n".join(json.dumps(row) for row in rows))
    else:
        from fedtune.console import print_table

        print_table(f"predictions of {args.model_dir}", [{k: r[k] for k in ("label", "probability", "sentence")}
                                                         for r in rows])
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `predict DIR --task sst2 "one" "two"`: sentences after an option
        if args.command != "predict" or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.sentences += extra
    try:
        if args.command == "algorithms":
            from fedtune.algorithms import registered
            from fedtune.client_losses import registered as client_losses

            for name, cls in registered().items():
                print(f"{name:14s} {cls.summary}\n{'':14s} rows in `compare`: {', '.join(label for label, _ in cls.rows)}")
            print("\nclient losses (--client-loss, any algorithm):")
            print("\n".join(f"{name:14s} {cls.summary}" for name, cls in client_losses().items()))
            return 0
        if args.command == "report":
            from fedtune.report import find_summaries, markdown_table

            skipped: list[str] = []
            summaries = find_summaries(args.folder, skipped)
            for reason in skipped:
                print(f"fedtune: skipped unreadable {reason}", file=sys.stderr)
            if not summaries:
                raise ValueError(f"no finished run (summary.json) under {args.folder}")
            print(markdown_table(summaries))
            return 0
        if args.command == "predict":
            return _predict(args)
        if args.command == "evaluate":
            from fedtune.predict import evaluate_export

            quiet_libraries()
            glue_dir = args.glue_dir or os.environ.get("GLUE_DIR", "")
            print(json.dumps(evaluate_export(args.model_dir, args.task, args.file, glue_dir)))
            return 0
        if args.command == "resume":
            from fedtune.runs import read_config
            from fedtune.simulation import run_federated

            config = Path(args.folder) / "config.json"
            try:
                settings = Settings.from_dict(read_config(config))
            except ValueError as err:
                raise ValueError(f"{config}: {err}") from None
            from fedtune.inputs import check_inputs

            check_inputs(settings.replace(resume=args.folder))
            quiet_libraries()
            run_federated(settings.replace(resume=args.folder), args.quiet)
            return 0
        settings = settings_from_args(args)
        if args.command == "compare":
            from fedtune.compare import check_jobs

            check_jobs(args.jobs, settings)  # before any file is read or written
        if args.command == "compare" and args.tune_share is not None:
            from fedtune.tune import check_share

            if not args.tune:
                raise ValueError("--tune-share sets the length of tuning trials: give it with --tune")
            check_share(args.tune_share)
        from fedtune.inputs import check_inputs

        check_inputs(settings)  # files and folders, before torch, transformers or Flower are imported
        quiet_libraries()
        if args.command == "centralized":
            from fedtune.centralized import run_centralized

            run_centralized(settings, quiet=args.quiet)
        elif args.command == "teacher":
            from fedtune.teacher import pretrain_teacher

            pretrain_teacher(settings, quiet=args.quiet)
        elif args.command == "run":
            from fedtune.simulation import run_federated

            run_federated(settings, quiet=args.quiet)
        elif args.command == "compare":
            from fedtune.compare import run_compare
            from fedtune.tune import TUNE_ROUND_SHARE

            methods = [m.strip() for m in args.methods.split(",") if m.strip()] or None
            remedy_names = [r.strip() for r in args.remedies.split(",") if r.strip()] or None
            run_compare(settings, args.preset, args.seeds, args.rank_sweep, methods, quiet=args.quiet, tune=args.tune,
                        remedy_names=remedy_names,
                        tune_share=TUNE_ROUND_SHARE if args.tune_share is None else args.tune_share, jobs=args.jobs,
                        cached_only_rows=args.cached_only)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a simulation (there `simulation.stop_on_interrupt` answers)
        from fedtune.runs import interrupted_message

        print(interrupted_message(), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
