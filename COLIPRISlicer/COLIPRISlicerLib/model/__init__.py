"""The model: identity and folders, loading from a spec (hub, folder, demo), device and precision choice."""
