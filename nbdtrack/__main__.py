from nbdtrack.cli import entry

entry()
