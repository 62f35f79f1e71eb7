"""Sub-apps of the `streamsink` command, one per noun."""
