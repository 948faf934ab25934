"""The `cdp` command: thin, parses and calls the parts."""
