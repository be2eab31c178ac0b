"""fedvault's ServerApp and its round loop."""
