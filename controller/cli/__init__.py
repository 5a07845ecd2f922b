"""Command-line entry points. Each subcommand is a module with `add_parser` and `run`."""
