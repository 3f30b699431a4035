"""``fleet``: the controller's command line.

Commands arrive with their issues (build, keys, release, assign, rollout, demo);
each is a thin layer over a function of the same name in ``fleet``.
"""

from __future__ import annotations

import click

from fleet import __version__


@click.group()
@click.version_option(__version__, prog_name="fleet")
def main() -> None:
    """edgefleet's fleet controller."""


if __name__ == "__main__":
    main()
