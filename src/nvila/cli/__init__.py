"""The ``nvila`` command line (top layer): main.py holds the registry, one module per verb."""
