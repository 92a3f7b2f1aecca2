"""`python -m bbfl.cli` = the `bbfl` command."""

from bbfl.cli import main

main()
