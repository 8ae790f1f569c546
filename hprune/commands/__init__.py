"""Subcommands of the `hprune` CLI (one module each; heavy imports stay inside run())."""
