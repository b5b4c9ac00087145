"""The subcommands of ``plada-send``, one module per stage of the sender.

Each module has, per subcommand, one small function that adds its parser and one that
runs it: parse, call one function of the domain, print its typed result. The modules
that load torch or faiss are imported when a subcommand runs, so that ``--help`` and
the light subcommands start in a fraction of a second.
"""
