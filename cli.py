"""
cli.py: what every script's command line shares: `--help` pages that show each flag's default,
a config printed as a compact table (format_config), and the one place where library warnings
that tell the user nothing are silenced.

    p = argparse.ArgumentParser(description=..., formatter_class=cli.HelpFormatter)

quiet_library_warnings() runs when this module is imported (the scripts import it through
selfplay.py or directly), so a run prints each real warning and none of these:
  - transformers 5 renaming gradient checkpointing (`is_gradient_checkpointing`,
    `gradient_checkpointing_enable`): peft and this project call the old names, which still work;
    the project supports transformers 4.57, which has only those.
"""
import argparse
import warnings

# (category, regex of the message start) of warnings that say nothing a user can act on
KNOWN_LIBRARY_WARNINGS = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """argparse's help with "(default: X)" after every flag that has a default (flags whose default
    is None, computed from other flags or optional, say in their help what happens instead), and
    the description's own line breaks kept."""

    def _get_help_string(self, action):
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)  # store_true: off
        if action.default is None or switch:
            return action.help
        return super()._get_help_string(action)


def format_config(config, width=110):
    """A config dict as a compact table for the terminal: `key = value` cells in key order, as many
    columns as fit in `width` characters, one row per line."""
    cells = [f"{key} = {value}" for key, value in sorted(config.items())]
    cell = max(map(len, cells), default=0) + 2
    columns = max(1, width // cell)
    n_rows = -(-len(cells) // columns)  # column-major: read down, then across
    rows = [cells[i::n_rows] for i in range(n_rows)]
    return "\n".join("  " + "".join(c.ljust(cell) for c in row).rstrip() for row in rows)


def quiet_library_warnings():
    for category, message in KNOWN_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


quiet_library_warnings()
