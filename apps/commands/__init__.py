"""The `visiondet` subcommands, one module each: ``add_arguments(parser)`` and ``run(args) -> int``.

A command parses its arguments into its job's options and calls the job; the job's module is imported
inside ``run`` (the CLI's one deliberate lazy import), so ``visiondet --help`` loads no torch or gradio.
"""
