"""fxqat."""
