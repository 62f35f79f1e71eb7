"""The streamsink worker: one wing per concern, imports running one way (see ARCHITECTURE.md)."""
