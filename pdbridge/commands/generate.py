"""Placeholder: replaced by the helper that owns this command."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("pdbridge generate: not built yet")
