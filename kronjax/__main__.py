"""Command line: ``python -m kronjax demo`` runs the El Niño forecast demo;
``python -m kronjax synthetic`` fits a simulated 3-D grid. ``--help`` for each.

Usage errors (an unknown command, a bad value) print one line to stderr and exit with
status 2, before any computation.
"""

import sys

from kronjax import cli, demo, synthetic_demo

COMMANDS = {"demo": demo, "synthetic": synthetic_demo}


def make_parser() -> cli.Parser:
    """The ``python -m kronjax`` parser, one subcommand per entry of ``COMMANDS``."""
    parser = cli.Parser(
        prog="python -m kronjax",
        description="kronjax demos: Kronecker-structured Gaussian processes with NumPyro.",
        epilog="'python -m kronjax <command> --help' lists each command's options.",
    )
    commands = parser.add_subparsers(
        title="commands", dest="command", metavar="command", required=True
    )
    for name, module in COMMANDS.items():
        sub = commands.add_parser(name, help=module.SUMMARY, description=module.DESCRIPTION)
        module.configure(sub)
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    if not argv:
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)}")
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
