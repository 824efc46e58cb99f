"""`python -m itrd` runs the CLI (the service spawns its processes this way)."""

from itrd.cli import main

main()
