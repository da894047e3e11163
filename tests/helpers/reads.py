"""Test settings lists that serve several commands (data and every stage's epochs in one list):
each command gets the entries it reads, since one it does not read is an error (docs/cli.md)."""

from __future__ import annotations


def only_read(prog: str, argv: list[str], shared: list[str]) -> list[str]:
    """``argv`` (command first) without the entries of ``shared`` that its command does not read;
    every other entry stays, so a test's own unread override is still reported."""
    import dpt.cli
    import semivit.cli

    command = argv[0]
    if prog == "semivit":
        reads, expand = semivit.cli.COMMANDS[command][1], lambda pair: pair
    else:
        reads = dpt.cli.COMMANDS[command].reads
        expand = lambda pair: dpt.cli.expand_overrides(command, [pair])[0]  # noqa: E731
    return [a for a in argv if a not in shared or reads.reads(expand(a).split("=", 1)[0])]
