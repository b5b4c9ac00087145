"""The subcommands of ``plada-receive``: one module per job (payloads, the daemon, the
trust store), each with one small function per subcommand that adds its parser and one
that runs it: parse, call one function of the domain, print its typed result. Option
groups shared by several subcommands live in :mod:`.options`."""
