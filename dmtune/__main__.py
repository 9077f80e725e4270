"""``python -m dmtune`` is the ``dmtune`` command."""

from dmtune.cli import app

app(prog_name="dmtune")
