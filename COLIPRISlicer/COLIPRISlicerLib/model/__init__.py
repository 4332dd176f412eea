"""The model: identity and folders, loading from a spec (hub, folder, demo), the text config,
device and precision choice."""
