from cdp.cli.main import entry

entry()
