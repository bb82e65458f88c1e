"""The ``sparsetrain`` command line: flags generated from the config schema and the registries
(:mod:`.common`), one function per subcommand (:mod:`.commands`), the entry point (:mod:`.main`).
Nothing in the library imports this package."""
