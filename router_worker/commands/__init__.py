"""CLI commands added to the Faust command group."""
