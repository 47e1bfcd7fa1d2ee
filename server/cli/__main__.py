"""`python -m server.cli`: the `loraplex` command."""

from server.cli import main

main()
