"""The command surface and the top-level modules (cli, config, errors)."""
