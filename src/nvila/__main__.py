"""``python -m nvila`` (also the entry point torchrun uses)."""

from nvila.cli.main import main

raise SystemExit(main())
