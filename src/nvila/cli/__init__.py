"""Command-line interface: ``nvila VERB ...``; verbs live in the COMMANDS registry of nvila.cli.main."""
