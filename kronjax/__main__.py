"""Command line: ``python -m kronjax demo`` runs the El Niño forecast demo;
``python -m kronjax synthetic`` fits a simulated 3-D grid."""

import sys

from kronjax import demo, synthetic_demo

COMMANDS = {"demo": demo.main, "synthetic": synthetic_demo.main}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m kronjax {{{','.join(COMMANDS)}}} [options]  (--help for each)")
        raise SystemExit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
