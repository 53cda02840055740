"""One module per ``lorakit`` subcommand: HELP, add_arguments(parser), run(args) -> exit code."""
