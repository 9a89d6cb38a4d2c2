"""``python -m unetdist.bench {train,data,predict,quality,all} [options]``: run benchmarks, print figures.

    python -m unetdist.bench train --preset padded --base-width 16 --tile 128 --batch 8
    python -m unetdist.bench train --help
    python -m unetdist.bench all --out bench-results/this-machine    # -> .json and .md

Each command prints a table of figures and the machine description, and ends with one
``key=value`` line (``bench all``: keys prefixed by the subcommand, ``train.trainer_vs_bare=...``).
Exit codes: 0 done; 2 bad arguments or a subcommand that is not in this checkout; 1 a failure.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path
from types import ModuleType

from unetdist.bench import (
    SUBCOMMANDS,
    Figures,
    emit_final_line,
    format_table,
    machine_description,
    markdown_table,
)


class SubcommandMissing(Exception):
    """A bench subcommand whose module is not in this checkout (yet)."""


def load_subcommand(name: str) -> ModuleType:
    """Import ``unetdist.bench.<name>`` only when it is asked for."""
    module_name = f"unetdist.bench.{name}"
    if importlib.util.find_spec(module_name) is None:
        raise SubcommandMissing(
            f"bench {name} is not available in this checkout: {module_name.replace('.', '/')}.py does not exist"
        )
    module = importlib.import_module(module_name)
    for needed in ("add_arguments", "run"):
        if not callable(getattr(module, needed, None)):
            raise SubcommandMissing(f"bench {name}: {module_name} has no {needed}() function")
    return module


def subcommand_parser(name: str, module: ModuleType) -> argparse.ArgumentParser:
    summary = (module.__doc__ or "").strip().split("\n")[0]
    parser = argparse.ArgumentParser(
        prog=f"python -m unetdist.bench {name}",
        description=summary,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    module.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top = argparse.ArgumentParser(
        prog="python -m unetdist.bench",
        description="Run unetdist benchmarks and print their figures; `COMMAND --help` lists its options.",
        usage=f"python -m unetdist.bench {{{','.join(SUBCOMMANDS)},all}} [options]",
    )
    top.add_argument("command", choices=[*SUBCOMMANDS, "all"])
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in (*SUBCOMMANDS, "all"):
        top.parse_args([command])  # argparse's own "invalid choice" message, exit 2
    if command == "all":
        return run_all(rest)
    try:
        module = load_subcommand(command)
    except SubcommandMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args = subcommand_parser(command, module).parse_args(rest)
    try:
        figures = module.run(args)
    except ValueError as err:  # bad settings (a ConfigError is a ValueError): say which, no traceback
        print(f"error: bench {command}: {err}", file=sys.stderr)
        return 2
    print_report({command: figures}, machine_description())
    emit_final_line(figures)
    return 0


def run_all(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unetdist.bench all",
        description="every available subcommand with small settings; writes OUT.json and OUT.md",
    )
    parser.add_argument("--out", required=True, help="path stem of the results: OUT.json and OUT.md")
    parser.add_argument("--only", default=",".join(SUBCOMMANDS), help="comma-separated subcommands to run")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SUBCOMMANDS))
    if unknown:
        parser.error(f"--only: unknown subcommand(s) {', '.join(unknown)}; choose from {', '.join(SUBCOMMANDS)}")
    out = Path(args.out)
    results: dict[str, Figures] = {}
    problems: dict[str, str] = {}
    failed = False
    for name in chosen:
        try:
            module = load_subcommand(name)
        except SubcommandMissing as err:
            problems[name] = f"skipped: {err}"
            print(f"note: {err}; skipped", file=sys.stderr)
            continue
        small = list(getattr(module, "SMALL_ARGS", []))
        print(f"bench all: {name} {' '.join(small)}", file=sys.stderr)
        try:
            results[name] = module.run(subcommand_parser(name, module).parse_args(small))
        except Exception as err:  # one broken bench must not hide the others' figures
            failed = True
            problems[name] = f"failed: {type(err).__name__}: {err}"
            traceback.print_exc(file=sys.stderr)
    machine = machine_description()
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "results": results,
        "problems": problems,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("") if out.suffix in (".json", ".md") else out
    json_path, markdown_path = stem.parent / f"{stem.name}.json", stem.parent / f"{stem.name}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    sections = {**results, **{name: {"status": text} for name, text in problems.items()}}
    markdown_path.write_text(markdown_table(sections, machine))
    print_report(sections, machine)
    print(f"\nwrote {json_path} and {markdown_path}")
    emit_final_line({f"{name}.{key}": value for name, figures in results.items() for key, value in figures.items()})
    return 1 if failed else 0


def print_report(sections: dict[str, Figures], machine: dict) -> None:
    for name, figures in sections.items():
        print(format_table(f"bench {name}", figures))
        print()
    print(format_table("machine", machine))


if __name__ == "__main__":
    sys.exit(main())
